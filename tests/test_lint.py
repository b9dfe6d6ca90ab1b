"""The code stays clean under the project's ruff configuration (pyproject.toml)."""
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(pathlib.Path(sys.executable).with_name("ruff"))
    if not pathlib.Path(ruff).exists():
        pytest.skip("ruff is not installed (it is in the test extra)")
    paths = ["nmcompile", "passes", "kernels", "tools", "tests"]
    done = subprocess.run([ruff, "check", "--output-format", "concise", *paths],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:]
