"""nmcompile.memory: the peak of live tensor bytes during a step, against cases whose peak is known by construction."""
from __future__ import annotations

import pytest
import torch

from nmcompile.memory import peak_bytes, tensor_bytes

MiB = 1 << 20
SLACK = 4096  # torch's own small bookkeeping allocations during a step (tens of bytes seen), far below a MiB


def about(measured: int, expected: int) -> bool:
    return expected <= measured < expected + SLACK


def test_the_peak_is_of_live_bytes_not_a_sum_of_allocations():
    def step():
        a = torch.empty(4 * MiB, dtype=torch.uint8)
        b = torch.empty(8 * MiB, dtype=torch.uint8)
        del a  # freed: the 2 MiB below fit in what is left of the 12 MiB peak
        c = torch.empty(2 * MiB, dtype=torch.uint8)
        return b, c

    (b, c), peak = peak_bytes(step)
    assert about(peak, 12 * MiB)  # a sum of allocations would say 14
    _, later = peak_bytes(lambda: torch.empty(MiB // 4, dtype=torch.float32) + 1)  # two live at once: x and x + 1
    assert about(later, 2 * MiB)


def test_what_was_alive_before_is_added():
    old = torch.empty(3 * MiB, dtype=torch.uint8)
    _, peak = peak_bytes(lambda: torch.empty(MiB, dtype=torch.uint8), before=tensor_bytes([old]))
    assert about(peak, 4 * MiB)
    # a block of an earlier measured step, freed during this one, lowers the running total as it goes
    kept = [peak_bytes(lambda: torch.empty(2 * MiB, dtype=torch.uint8))[0]]

    def frees_then_allocates():
        kept.clear()
        return torch.empty(MiB, dtype=torch.uint8)

    _, peak = peak_bytes(frees_then_allocates, before=2 * MiB)
    assert about(peak, 2 * MiB)  # 2 alive at the start, then 1


def test_tensor_bytes_counts_a_storage_once():
    x = torch.empty(1000, dtype=torch.float32)
    assert tensor_bytes([x, x[10:], x.view(10, 100).t()]) == 4000
    assert tensor_bytes([x, torch.empty(10, dtype=torch.float16)]) == 4020


def test_tensor_bytes_of_a_wrapper_subclass_counts_what_it_wraps():
    optim = pytest.importorskip("torchao.optim")
    p = torch.nn.Parameter(torch.randn(64, 256))
    opt = optim.AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    state = [t for t in opt.state[p].values() if isinstance(t, torch.Tensor) and t.numel() == p.numel()]
    assert state and all(type(t) is not torch.Tensor for t in state)  # the 8-bit subclass
    # int8 codes per element plus one fp32 scale per block of 256: about a quarter of fp32's bytes
    assert all(p.numel() <= tensor_bytes([t]) <= p.numel() * 1.1 for t in state)
