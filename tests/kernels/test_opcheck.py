"""torch.library.opcheck: schemas, fake kernels, autograd registration, AOT dispatch, for every op of the
catalog and its codes ops, with the parameters the backend's defaults give it (so a new op is checked by
default), per-row and power-of-two scales where it has them."""
import pytest
import torch

from nmcompile.kernels.catalog import OPS
from nmcompile.kernels.grouping import uniform_shape
from nmcompile.kernels.luq import luq_noise_shape
from nmcompile.passes.config import NMConfig


def _variants(spec) -> list[dict]:
    base = {"n": 2, "m": 4, "dim": 1} if spec.kind == "prune" else NMConfig().params_for(spec)
    out = [base]
    if spec.row_scales:
        out.append({**base, "dim": 0})
    if spec.pow2_scales:
        out.append({**base, "pow2": True})
    return out


CASES = {}
for _spec in OPS.values():
    for _params in _variants(_spec):
        _id = ",".join(f"{k}={v}" for k, v in _params.items())
        _form = _spec.form(_params)  # a codes op takes what its form says the codes hold exactly
        for _op in (_spec.name, _spec.codes_op if _form.float8 else None, _spec.int8_op if _form.int8 else None):
            for _u in (("seeds", "uniforms") if _spec.sampled else ("",)) if _op is not None else ():
                CASES[f"{_op}[{_id}]{_u}"] = (_spec, _op, _params, _u)


def test_every_op_of_the_catalog_is_checked():
    named = {op for _, op, _, _ in CASES.values()}
    assert named == {n for s in OPS.values() for n in (s.name, s.codes_op, s.int8_op) if n is not None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_opcheck(case):
    spec, op, params, u = CASES[case]
    torch.manual_seed(0)
    # the forward quantizers pass the gradient straight through: their autograd registration is checked too
    x = torch.randn(6, 16, requires_grad=spec.stage == "forward" and op == spec.name)
    args = list(spec.call_args(x.detach(), **params))
    if u == "uniforms":  # explicit uniforms instead of the int64 seeds standing for them
        shape = (uniform_shape(x.shape, params["m"], params["dim"]) if spec.kind == "prune"
                 else luq_noise_shape(x.shape, params.get("samples", 1)))
        args[spec.args.index("u")] = torch.rand(shape)
    torch.library.opcheck(getattr(torch.ops.nm, op).default, (x, *args))


@pytest.mark.parametrize("sampled", [True, False])
def test_opcheck_pruning_along_a_dim_with_a_remainder(sampled):
    """dim 0 of 10 rows in groups of 4: the last group is partial; explicit uniforms as well as seeds."""
    x = torch.randn(10, 3)
    u = torch.rand(uniform_shape((10, 3), 4, 0)) if sampled else None
    args = (x, u, 2, 4, 0) if sampled else (x, 2, 4, 0)
    torch.library.opcheck((torch.ops.nm.mvue if sampled else torch.ops.nm.greedy).default, args)
