"""``recompute``: the backward recomputes the forward int8 GEMMs' fp32 outputs from the codes it keeps.

The int8 GEMM is exact and its rescale deterministic, so the recomputed output is bit for bit the one the
forward produced: the same losses and gradients, with less kept. Tested from training steps, on one thread
(where Inductor's kernels are deterministic: its parallel reductions are not, across threads): the same losses
and gradients bit for bit, and a lower measured peak (``nmcompile.memory``).
"""
from __future__ import annotations

import pytest
import torch

from nmcompile import NMConfig
from nmcompile.kernels import gemm
from nmcompile.memory import peak_bytes
from nmcompile.recipes import PRESETS
from tests.models import MLP, Encoder

INT8 = gemm.int8_cpu_support()
needs_int8 = pytest.mark.skipif(INT8 is not None, reason=f"int8 GEMMs: {INT8}")
PRESET = {**PRESETS["int8"], "keep_first_last": False, "dense_if_faster": False, "recompute": False}


class FusedEncoder(torch.nn.Module):
    """nn.TransformerEncoderLayer with its fused attention kernel (SDPA's CPU flash attention, opaque to the pass)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x)


def models():
    torch.manual_seed(0)
    return {"mlp": (MLP((32, 64, 64, 16)), torch.randn(8, 16, 32)), "encoder": (Encoder(32, 4), torch.randn(4, 16, 32)),
            "fused attention": (FusedEncoder(32, 4), torch.randn(4, 16, 32))}


def peak(options: dict) -> int:
    """The peak of live bytes of one training step of a Transformer encoder layer under Inductor."""
    torch.manual_seed(0)
    model, x = Encoder(64, 4), torch.randn(8, 64, 64)
    compiled = torch.compile(model, backend="nm", options=options)
    compiled(x).pow(2).mean().backward()  # compiles
    for p in model.parameters():
        p.grad = None
    return peak_bytes(lambda: compiled(x).pow(2).mean().backward())[1]


@needs_int8
def test_the_backward_keeps_less_when_it_recomputes_the_int8_gemms_outputs():
    """The encoder layer's up-projection output feeds ReLU and the second LayerNorm's residual: recomputed from
    the codes the backward keeps anyway (in the measured run: 3.03 MB -> 2.66 MB, with Inductor's min-cut)."""
    plain, recomputed = peak(PRESET), peak({**PRESET, "recompute": True})
    assert recomputed < 0.95 * plain, (plain, recomputed)


def train(options: dict, name: str, steps: int = 3) -> tuple[list, list]:
    model, x = models()[name]
    compiled = torch.compile(model, backend="nm", options=options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    losses = []
    for _ in range(steps):
        loss = compiled(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    loss = compiled(x).float().pow(2).mean()
    loss.backward()
    return losses, [p.grad.clone() for p in model.parameters()]


@needs_int8
@pytest.mark.parametrize("name", ["mlp", "encoder", "fused attention"])
def test_recompute_changes_no_number(name):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Inductor's parallel reductions are not deterministic across threads
    try:
        plain = train(PRESET, name)
        recomputed = train({**PRESET, "recompute": True}, name)
    finally:
        torch.set_num_threads(threads)
    assert plain[0] == recomputed[0]
    assert all(torch.equal(a, b) for a, b in zip(plain[1], recomputed[1]))


def test_the_option_is_a_bool_and_on_in_the_int8_preset():
    assert NMConfig(recompute=True).recompute and PRESETS["int8"]["recompute"] is True
    with pytest.raises(ValueError, match=r"recompute='yes' must be True or False"):
        NMConfig(recompute="yes")


@needs_int8
def test_fused_attention_on_recomputed_qkv_is_recomputed_not_kept():
    """q, k and v come from the qkv GEMM's recomputed output: the attention forward is recomputed too, so the
    backward keeps no fp32 attention output (nmcompile.kept reads what it keeps); without recompute it does."""
    from nmcompile.capture import run_captured

    def kept(options):
        model, x = models()["fused attention"]
        report = run_captured(model, (x,), options).report
        tensors = [k for g in report.backward for k in g.kept] + [k.as_dict() for k in report.kept]
        attention = [k for k in tensors if k["dtype"] == "float32" and tuple(k["shape"]) == (4, 4, 16, 8)]
        return attention, report.recomputed

    attention, again = kept({**PRESET, "recompute": True})
    assert attention == [] and "layer.self_attn (attention)" in again
    attention, again = kept(PRESET)
    assert attention and again == []  # the output [batch, heads, tokens, head dim] the SDPA backward reads
