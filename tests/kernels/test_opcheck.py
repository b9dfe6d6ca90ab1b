"""torch.library.opcheck: schemas, fake kernels, autograd registration, AOT dispatch."""
import pytest
import torch

from nmcompile.kernels.grouping import uniform_shape

CASES = {
    "mvue": lambda: (torch.randn(6, 16), torch.rand(uniform_shape((6, 16), 4, 1)), 2, 4, 1),
    "mvue_dim0_remainder": lambda: (torch.randn(10, 3), torch.rand(uniform_shape((10, 3), 4, 0)), 2, 4, 0),
    "greedy": lambda: (torch.randn(6, 16), 2, 4, 1),
    "luq": lambda: (torch.randn(5, 7), torch.rand(2, 5, 7), 4, "strict"),
    "sawb": lambda: (torch.randn(5, 7, requires_grad=True), 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_opcheck(case):
    op = getattr(torch.ops.nm, case.split("_")[0]).default
    torch.library.opcheck(op, CASES[case]())
