import os

import pytest
import torch

# Without a GPU the Triton kernels (kernels/cuda.py) run in Triton's CPU interpreter; it must be
# chosen before anything imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests-only quantizer in the catalog before any test module reads it (tests/nmcompile/test_extra_op.py)
if os.environ.get("NMCOMPILE_TEST_EXTRA_OP"):
    from tests.extra_op import register

    register()


@pytest.fixture(autouse=True)
def _seed_and_reset():
    """Every test starts from a fixed seed and a clean Dynamo cache."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def fallback_random():
    """Random ops fall back to torch's generator in graph order, so compiled and eager draws match."""
    with torch._inductor.config.patch(fallback_random=True):
        yield


def heavy_tailed(*shape, seed=0):
    """Gradient-like values: log-normal magnitudes with random signs, some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(2.0 * torch.randn(*shape, generator=g, dtype=torch.float64))
    sign = torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0).double()
    x = mag * sign
    x[torch.rand(*shape, generator=g) < 0.05] = 0.0
    return x.float()
