"""A quantizer that exists only for the tests: deterministic round-to-nearest of the gradient onto 2^(bits-1)-1
magnitudes with one absmax scale per tensor (``rtn``; biased, the baseline unbiased rounding is compared with).

It is the next new quantizer in miniature: its whole definition is this file, a torch op and one catalog
description, with nothing else in the tree told about it. ``register()`` adds it to the catalog; with
``NMCOMPILE_TEST_EXTRA_OP=1`` tests/conftest.py does so before any test module is collected, and the catalog's
walk through every consumer (tests/nmcompile/test_catalog.py) and the opchecks (tests/kernels/test_opcheck.py)
then cover it too (tests/nmcompile/test_extra_op.py runs them so)."""
from __future__ import annotations

import torch

from nmcompile.kernels import catalog

SCHEMA = "(Tensor x, int bits) -> Tensor"


@torch.library.custom_op("nm::rtn", mutates_args=(), schema=SCHEMA)
def rtn(x: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2 ** (bits - 1) - 1
    scale = x.detach().abs().amax().float() / levels
    if scale == 0:
        return x.clone()
    return (torch.round(x.float() / scale).clamp(-levels, levels) * scale).to(x.dtype)


@rtn.register_fake
def _(x, bits):
    return torch.empty_like(x)


def _form(p) -> catalog.Form:
    return catalog.Form(max_code=2 ** (p["bits"] - 1) - 1, why="no float8 codes op", int8_why="no int8 codes op")


RTN = catalog.OpSpec(
    "rtn", kind="quantize", stage="gradient", schema=SCHEMA, unbiased=False, options={"bits": "bits"},
    bits=range(2, 9), summary="round to nearest onto 2^(bits-1)-1 magnitudes, absmax scale (tests only)",
    label=lambda p: f"rtn{p['bits']}", form=_form, onnx_type="RTN", onnx_attrs=("bits",), color="#e599f7",
)


def register() -> catalog.OpSpec:
    return catalog.register(RTN)
