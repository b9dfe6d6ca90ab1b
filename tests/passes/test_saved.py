"""``saved_int8``: the backward reads an absmax8 copy (one scale per row) of each activation no int8 GEMM produced.

- its defining property: a LayerNorm's backward, compiled, equals the analytic LayerNorm backward evaluated at
  the rounded copy of the normalized input (``kernels.absmax.absmax_math``, per row), to fp32 rounding, and differs
  from the exact backward by much more than that (so the test sees the option);
- the forward does not change: the same losses bit for bit, on one thread;
- what is kept: no fp32 activation with rows of ``MIN_ROW`` or more, other than the graph's inputs, is left for the
  backward (read from the partitioned graphs, ``nmcompile.kept``), where without the option the LayerNorms' are;
Its bias on training is measured, not tested (docs/results.md).
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from nmcompile import backend
from nmcompile.capture import run_captured
from nmcompile.kernels.absmax import absmax_math
from nmcompile.passes.config import NMConfig
from nmcompile.recipes import PRESETS
from nmcompile.passes.saved import MIN_ROW
from tests.models import Encoder

FORWARD_ONLY = {"fwd_quant": "absmax", "fwd_bits": 8, "fwd_scales": "row", "keep_first_last": False,
                "recompute": True, "inner": "aot_eager"}  # deterministic: no gradient quantizer


def _layer_norm_grad(xhat: torch.Tensor, rstd: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dL/dx of a LayerNorm without affine, from its normalized input and 1/std: the textbook formula."""
    return rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))


def test_layer_norm_backward_reads_the_rounded_copy():
    """h = a @ W, then a LayerNorm and a linear loss: the backward keeps h (a GEMM's output: not recomputed) and
    the norm's statistics. With the option it keeps h's codes: dL/da must be the textbook LayerNorm backward at
    x̂' = (absmax8(h) - mean)·rstd, with the statistics of the exact h, times Wᵀ."""
    torch.manual_seed(0)
    a = torch.randn(64, 48).requires_grad_()
    w = torch.randn(48, 96) * torch.linspace(0.2, 3, 96)  # columns of different sizes: rows far from uniform
    c = torch.randn(96)

    def f(a):
        return (F.layer_norm(a @ w, (96,)) * c).sum()

    compiled = torch.compile(f, backend="nm", options={"saved_int8": True, "inner": "aot_eager"})
    (got,) = torch.autograd.grad(compiled(a), a)
    with torch.no_grad():
        h = a @ w
        mean, rstd = h.mean(-1, keepdim=True), torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
        copy, _ = absmax_math(h, 8, dim=-1)
        upstream = c.expand_as(h)
        expected = _layer_norm_grad((copy - mean) * rstd, rstd, upstream) @ w.T
        exact = _layer_norm_grad((h - mean) * rstd, rstd, upstream) @ w.T
    scale = exact.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale  # fp32 rounding of the two ways to compute it
    assert (got - exact).abs().max() >= 1e-3 * scale  # the option is visible: the copy is rounded


def test_the_forward_is_unchanged():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = _losses()
    finally:
        torch.set_num_threads(threads)
    assert losses[True][0] == losses[False][0]  # the same forward, bit for bit
    assert losses[True][1:] != losses[False][1:]  # and a different backward, so different later steps


def _losses() -> dict:
    losses = {}
    for saved in (False, True):
        torch.manual_seed(0)
        model, x = Encoder(32, 4), torch.randn(4, 16, 32)
        step = torch.compile(model, backend="nm", options={**FORWARD_ONLY, "saved_int8": saved})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            loss = step(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.setdefault(saved, []).append(loss.item())
    return losses


@pytest.mark.parametrize("saved", [False, True])
def test_what_the_backward_keeps(saved):
    torch.manual_seed(0)
    run = run_captured(Encoder(32, 4), (torch.randn(4, 16, 32),), {**FORWARD_ONLY, "saved_int8": saved})
    report = run.report
    kept = [*report.kept] + [k for g in report.backward for k in g.kept]
    as_dict = [k if isinstance(k, dict) else k.as_dict() for k in kept]
    wide_fp = [k for k in as_dict if k["dtype"] == "float32" and k["what"] != "input" and len(k["shape"]) >= 2
               and k["shape"][-1] >= MIN_ROW]
    if saved:
        assert wide_fp == [], wide_fp
        assert any(k["what"] == "saved_int8" and k["dtype"] == "int8" for k in as_dict)
    else:
        assert any("norm" in k["module"] for k in wide_fp), wide_fp


def test_option_is_checked():
    with pytest.raises(ValueError, match="saved_int8=1 must be True or False"):
        NMConfig(saved_int8=1)
    assert not NMConfig(saved_int8=True).is_noop
    assert "saved_int8" not in PRESETS["int8"]  # off in the preset: it changes the numbers


def test_inductor_computes_what_aot_eager_does():
    """Under Inductor the option goes through its partitioner hook (custom_partitioner_fn): the same gradients as
    under aot_eager to fp32 rounding, and far from those without the option."""
    grads = {}
    for inner, saved in (("aot_eager", True), ("inductor", True), ("inductor", False)):
        torch.manual_seed(0)
        model, x, r = Encoder(32, 4), torch.randn(4, 16, 32), torch.randn(4, 16, 32)
        step = torch.compile(model, backend="nm", options={**FORWARD_ONLY, "inner": inner, "saved_int8": saved})
        (step(x) * r).sum().backward()
        grads[inner, saved] = torch.cat([p.grad.flatten() for p in model.parameters()])

    def rel(a, b):
        return ((grads[a] - grads[b]).norm() / grads[b].norm()).item()

    effect = rel(("inductor", True), ("inductor", False))  # about 3e-3 here: the rounded copies
    assert effect > 1e-4
    # Inductor's and aot_eager's fp32 activations differ by ~1e-7 relative, so a copy's level flips where a value
    # lies that close to a rounding boundary: a share f ~ 2e-7·127 ~ 3e-5 of the elements. A flip moves an element
    # by one step where the rounding itself moves it by step/√12 RMS, so the flips' share of the option's effect is
    # about √f·√12 ~ 0.02: a tenth bounds it with room on any CPU's rounding, and is far from the effect itself.
    assert rel(("inductor", True), ("aot_eager", True)) < effect / 10


def test_the_partitioner_hook_survives_a_copy_of_inductors_config():
    """torch 2.11 copies Inductor's config (``get_config_copy``) before compiling: a copy rebuilt from the state
    that goes into the cache key (its uuid) could not partition, and failed to pickle into the cache key again."""
    hook = backend._Partitioner(None, True, None)
    assert copy.deepcopy(hook) is hook and copy.copy(hook) is hook and callable(copy.deepcopy({"p": hook})["p"])
    assert pickle.loads(pickle.dumps(hook)).__dict__ == {"uuid": hook.uuid()}  # the cache key: what it depends on
    assert backend._Partitioner(None, True, print).uuid() is None  # recording: never served from the caches
