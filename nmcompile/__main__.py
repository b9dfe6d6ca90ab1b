import sys

from nmcompile.cli import main

sys.exit(main())
