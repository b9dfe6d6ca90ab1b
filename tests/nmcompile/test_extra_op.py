"""The next new quantizer touches one file: tests/extra_op.py's ``rtn`` (a torch op and its catalog description),
registered at run time, passes the catalog's walk through every consumer and the opchecks, with nothing else in
the tree naming it."""
import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest

from nmcompile.kernels import catalog

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_a_new_quantizer_is_one_description_and_one_op():
    named = [str(p.relative_to(ROOT)) for folder in ("nmcompile", "kernels", "passes", "tools")
             for p in (ROOT / folder).rglob("*.py") if re.search(r"\brtn\b", p.read_text())]
    assert named == []  # the tree is not told about it
    env = {**os.environ, "NMCOMPILE_TEST_EXTRA_OP": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
                           "tests/nmcompile/test_catalog.py", "tests/kernels/test_opcheck.py", "-k", "rtn", "-rA"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    passed = set(re.findall(r"^PASSED \S+::(\w+)\[rtn", done.stdout, re.M))
    assert passed == {"test_every_description_is_complete", "test_every_op_reaches_every_consumer",
                      "test_every_op_is_exported_to_onnx", "test_every_rewritten_gemm_gets_a_kernel_or_a_reason",
                      "test_the_noise_monitor_measures_every_gradient_op", "test_opcheck"}, done.stdout[-3000:]


def test_registering_needs_the_op_and_a_free_name():
    from tests.extra_op import RTN  # defines torch.ops.nm.rtn; registers nothing

    with pytest.raises(ValueError, match="an op named 'luq' is already in the catalog"):
        catalog.register(catalog.OPS["luq"])
    with pytest.raises(ValueError, match=r"define torch.ops.nm.nope \(torch.library.custom_op\) before registering"):
        catalog.register(dataclasses.replace(RTN, name="nope"))
    assert "nope" not in catalog.OPS
