"""``python -m nmcompile.demo``: the same as ``nmcompile demo``."""
import argparse
import sys

from nmcompile.demo import __doc__ as DOC
from nmcompile.demo.cli import add_arguments, main

parser = argparse.ArgumentParser(prog="nmcompile demo", description=DOC.splitlines()[0])
sys.exit(main(add_arguments(parser).parse_args()))
