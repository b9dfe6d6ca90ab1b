"""Eager SINGD: parity with the official package, features, errors, checkpoints, bf16."""

import io
import warnings

import pytest
import torch
from torch import nn

from nmcompile.optim import SINGD
from singd_helpers import (
    STRUCTURE_NAMES, assert_same_training, classification_batch, cnn, mlp, rel_err, train,
)

STEPS = 24
HYPER = dict(lr=0.05, momentum=0.9, damping=1e-3, alpha1=0.5, weight_decay=1e-2, T=2, lr_cov=0.05)


def batches(count=STEPS, **kw):
    return [classification_batch(seed=100 + i, **kw) for i in range(count)]


def run_both(reference_singd, make_model, data, hyper, loss_fn=None, make_scheduler=None):
    model, ref_model = make_model(), make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # upstream warns about naive Toeplitz fall-backs
        opt = SINGD(model, **hyper)
        ref_opt = reference_singd(ref_model, **hyper)
        for m, o in ((model, opt), (ref_model, ref_opt)):
            sched = make_scheduler(o) if make_scheduler else None
            train(m, o, data, loss_fn=loss_fn, scheduler=sched)
    return model, opt, ref_model, ref_opt


@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "kfac_like"])
@pytest.mark.parametrize("structure", STRUCTURE_NAMES)
def test_parity_with_official_package(reference_singd, structure, kfac_like):
    hyper = dict(HYPER, structures=(structure, structure), kfac_like=kfac_like,
                 alpha1=0.0 if kfac_like else 0.5)
    assert_same_training(*run_both(reference_singd, mlp, batches(), hyper))


def _seq_loss(out, y):
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _sum_loss(out, y):
    return nn.functional.cross_entropy(out, y, reduction="sum")



CONFIGS = {
    # Conv2d with stride, symmetric string padding, channel groups and dilation
    "conv_expand": dict(model=cnn, data=dict(shape=(3, 8, 8)), hyper=dict(kfac_approx="expand")),
    "conv_reduce": dict(model=cnn, data=dict(shape=(3, 8, 8)), hyper=dict(kfac_approx="reduce")),
    "conv_batch+sequence": dict(model=cnn, data=dict(shape=(3, 8, 8)),
                                hyper=dict(loss_average="batch+sequence")),
    # Linear layers with a weight-sharing (sequence) dimension
    # (upstream loses its tensor hook when an in-place op follows a >2-d Linear output,
    # so these use out-of-place activations; see test_inplace_activation_after_sequence_linear)
    "seq_expand_batch+sequence": dict(
        model=lambda: mlp(inplace=False), data=dict(shape=(6, 20)), seq=True,
        hyper=dict(loss_average="batch+sequence", kfac_approx="expand")),
    "seq_reduce_batch": dict(model=lambda: mlp(inplace=False), data=dict(shape=(6, 20)), seq=True,
                             hyper=dict(loss_average="batch", kfac_approx="reduce")),
    "sum_loss": dict(model=mlp, loss=_sum_loss, hyper=dict(loss_average=None, lr=2e-3)),
    "normalize_lr_cov_and_schedule": dict(
        model=mlp, hyper=dict(normalize_lr_cov=True, lr_cov=lambda step: 0.02 + 0.01 * (step % 3))),
    "no_momentum_T1": dict(model=mlp, hyper=dict(momentum=0.0, T=1, structures=("diagonal", "dense"))),
    "lr_scheduler": dict(model=mlp, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 5, 0.5),
                         hyper=dict(structures=("hierarchical15_15", "block30diagonal"))),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_features(reference_singd, name):
    cfg = CONFIGS[name]
    shape = cfg.get("data", {}).get("shape", (20,))
    data = batches(shape=shape)
    if cfg.get("seq"):  # per-token labels
        data = [(x, torch.randint(0, 5, x.shape[:2], generator=torch.Generator().manual_seed(i)))
                for i, (x, _) in enumerate(data)]
    hyper = dict(HYPER, **cfg["hyper"])
    loss_fn = cfg.get("loss") or (_seq_loss if cfg.get("seq") else None)
    result = run_both(reference_singd, cfg["model"], data, hyper, loss_fn, cfg.get("scheduler"))
    assert_same_training(*result)


def test_parity_param_groups(reference_singd):
    """Per-group structures, lr, T and kfac_like (as upstream allows)."""
    def groups(model):
        return [
            dict(params=model[0].parameters(), structures=("triutoeplitz", "hierarchical15_15"), lr=0.02),
            dict(params=model[2].parameters(), kfac_like=True, alpha1=0.0, T=3),
            dict(params=model[4].parameters()),
        ]
    model, ref_model = mlp(), mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SINGD(model, groups(model), **HYPER)
        ref_opt = reference_singd(ref_model, groups(ref_model), **HYPER)
        for m, o in ((model, opt), (ref_model, ref_opt)):
            train(m, o, batches())
    assert_same_training(model, opt, ref_model, ref_opt)


def test_upstream_block_diagonal_bug():
    """singd 0.0.5's block-diagonal ``rmatmat`` multiplies by K instead of Kᵀ (ours is right).

    If this test fails, upstream fixed the bug and the patch in conftest can go."""
    from singd.structures.blockdiagonal import Block30DiagonalMatrix as Official

    from nmcompile.optim.structures import Block30DiagonalMatrix as Ours

    torch.manual_seed(0)
    sym = lambda: (lambda m: m + m.T)(torch.randn(35, 35))  # noqa: E731
    A, B = sym(), sym()
    K_official = Official.from_dense(A) @ Official.from_dense(B)
    K_ours = Ours.from_dense(A) @ Ours.from_dense(B)
    dense = K_ours.to_dense()
    torch.testing.assert_close(K_official.to_dense(), dense)
    X = torch.randn(35, 4)
    torch.testing.assert_close(K_ours.rmatmat(X), dense.T @ X)
    assert rel_err(K_official.rmatmat(X), dense.T @ X) > 0.1
    assert rel_err(K_official.rmatmat(X), dense @ X) < 1e-6


def test_statistics_match_official_hooks(reference_singd):
    """H_K, H_C collected through the probes equal upstream's hook accumulators."""
    structures = ("hierarchical15_15", "triltoeplitz")
    model, ref_model = cnn(), cnn()
    x, y = classification_batch(shape=(3, 8, 8))
    opt = SINGD(model, structures=structures)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_opt = reference_singd(ref_model, structures=structures)
        for m in (model, ref_model):
            nn.functional.cross_entropy(m(x), y).backward()
    for name, layer in opt._layers.items():
        H_K = type(opt.Ks[name])(opt.Ks[name].dim, layer.tap.probe_K.grad)
        H_C = type(opt.Cs[name])(opt.Cs[name].dim, layer.tap.probe_C.grad)
        assert rel_err(H_K.to_dense(), ref_opt.H_Ks[name].to_dense()) < 1e-6
        assert rel_err(H_C.to_dense(), ref_opt.H_Cs[name].to_dense()) < 1e-6


# --------------------------------------------------------------------------- features
def test_gradient_accumulation_equals_full_batch():
    """Micro-batches (loss rescaled to the mini-batch mean) give the mini-batch trajectory.

    The accumulated H_K is (mini/micro)× and H_C (micro/mini)× the mini-batch ones; SINGD's
    trace coupling makes the update invariant to that, as upstream's test relies on."""
    full, micro = mlp(), mlp()
    hyper = dict(HYPER, T=1)
    opt_full, opt_micro = SINGD(full, **hyper), SINGD(micro, **hyper)
    for x, y in batches(12, n=24):
        opt_full.zero_grad()
        nn.functional.cross_entropy(full(x), y).backward()
        opt_full.step()
        opt_micro.zero_grad()
        for xs, ys in zip(x.split(6), y.split(6)):
            (nn.functional.cross_entropy(micro(xs), ys) * 6 / 24).backward()
        opt_micro.step()
    assert_same_training(micro, opt_micro, full, opt_full, rtol=1e-5)


def test_inplace_activation_after_sequence_linear():
    """The statistics survive ReLU(inplace=True) on a 3-d Linear output (upstream's do not)."""
    x = torch.randn(4, 6, 20)
    stats = []
    for inplace in (True, False):
        model = mlp(inplace=inplace)
        opt = SINGD(model)
        model(x).square().mean().backward()
        stats.append([(l.tap.probe_K.grad, l.tap.probe_C.grad) for l in opt._layers.values()])
    for (k1, c1), (k2, c2) in zip(*stats):
        assert k1 is not None and torch.equal(k1, k2) and torch.equal(c1, c2)


def test_statistics_accumulate_over_backward_passes():
    model = mlp()
    opt = SINGD(model)
    x, y = classification_batch()
    nn.functional.cross_entropy(model(x), y).backward()
    once = opt._layers["0"].tap.probe_K.grad.clone()
    nn.functional.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(opt._layers["0"].tap.probe_K.grad, 2 * once)


def test_statistics_only_on_update_steps():
    model = mlp()
    opt = SINGD(model, T=3)
    x, y = classification_batch()
    collected = []
    for _ in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        collected.append(opt._layers["0"].tap.probe_K.grad is not None)
        opt.step()
    assert collected == [True, False, False, True, False, False]


def test_no_grad_forward_collects_nothing_and_keeps_output():
    model = mlp()
    x, y = classification_batch()
    expected = model(x)
    opt = SINGD(model)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(model(x), expected)  # the tap is the identity on outputs
    assert all(layer.tap.probe_K.grad is None for layer in opt._layers.values())


def test_unsupported_parameters_warn_and_stay_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match=r"1 \(LayerNorm\).*second optimizer"):
        opt = SINGD(model, T=1)
    norm_before = [p.clone() for p in model[1].parameters()]
    linear_before = model[0].weight.clone()
    train(model, opt, batches(3, shape=(8,), classes=3))
    assert all(torch.equal(a, b) for a, b in zip(norm_before, model[1].parameters()))
    assert not torch.equal(linear_before, model[0].weight)


def test_explicit_unsupported_parameter_is_an_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match=r"\['1.weight', '1.bias'\].*second optimizer"):
        SINGD(model, params=model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(structures=("dense", "blockdiag")), r"'blockdiag'.*allowed.*'block30diagonal'"),
        (dict(structures="dense"), "pair of names"),
        (dict(loss_average="mean"), r"loss_average='mean'.*allowed.*'batch\+sequence'"),
        (dict(kfac_approx="full"), r"kfac_approx='full'.*allowed.*'expand', 'reduce'"),
        (dict(T=0), "T must be a positive integer, got 0"),
        (dict(lr=-1.0), "lr must be a non-negative number, got -1.0"),
        (dict(preconditioner_dtype=torch.bfloat16), "preconditioner_dtype must be a pair"),
    ],
)
def test_bad_arguments_name_value_and_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SINGD(mlp(), **kwargs)


def test_layer_split_over_groups_is_an_error():
    model = mlp()
    with pytest.raises(ValueError, match="layer '0' are in different parameter groups"):
        SINGD(model, [dict(params=[model[0].weight]), dict(params=[model[0].bias])])


def test_ddp_wrapper_is_rejected():
    wrapped = nn.DataParallel(mlp())
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        SINGD(wrapped)


def test_kfac_like_forces_zero_alpha1():
    with pytest.warns(UserWarning, match="alpha1=0.5"):
        opt = SINGD(mlp(), kfac_like=True)
    assert opt.param_groups[0]["alpha1"] == 0.0 and not opt.m_Ks


def test_hook_handles_restore_the_layers():
    model = mlp()
    opt = SINGD(model)
    for handle in opt.hook_handles:
        handle.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())
    x, y = classification_batch()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="no curvature statistics.*layer '0'"):
        opt.step()


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("pending", [False, True], ids=["after_step", "between_backward_and_step"])
def test_checkpoint_round_trip_gives_identical_trajectory(pending):
    hyper = dict(HYPER, T=3, structures=("hierarchical15_15", "triutoeplitz"))
    data = batches(14)
    model = mlp()
    opt = SINGD(model, **hyper)
    train(model, opt, data[:7])  # saved mid-cycle: step 7 is not an update step (T=3)
    if pending:  # save on update step 9 after backward, before step: statistics pending
        train(model, opt, data[7:9])
        opt.zero_grad()
        x, y = data[9]
        nn.functional.cross_entropy(model(x), y).backward()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    restored = mlp(seed=123)
    restored.load_state_dict(saved["model"])
    restored_opt = SINGD(restored, **hyper)
    restored_opt.load_state_dict(saved["opt"])
    if pending:  # parameter gradients are model state the user restores alongside
        for p, q in zip(model.parameters(), restored.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        restored_opt.step()
    rest = data[10:] if pending else data[7:]
    train(model, opt, rest)
    train(restored, restored_opt, rest)
    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)
    for key in ("Ks", "Cs", "m_Ks", "m_Cs"):
        for name, mat in getattr(opt, key).items():
            assert torch.equal(mat.flat, getattr(restored_opt, key)[name].flat)
    assert restored_opt.steps == opt.steps


def test_checkpoint_from_other_structure_is_rejected():
    saved = SINGD(mlp()).state_dict()
    with pytest.raises(ValueError, match="do not match"):
        SINGD(mlp(), structures=("diagonal", "dense")).load_state_dict(saved)


# --------------------------------------------------------------------------- precision
def test_bf16_singd_stays_finite_where_kfac_inverse_fails():
    """Low-rank inputs: the damped Kronecker factor A + λI is positive definite in exact
    arithmetic, but bf16 rounding swallows λ = 1e-3, so inverting it (KFAC) is impossible
    or meaningless in bf16; SINGD never inverts and keeps finite bf16 factors."""
    torch.manual_seed(0)
    d, n = 32, 8
    basis = torch.randn(4, d) * 3  # inputs live in a 4-dim subspace
    teacher = torch.randn(d, 5)
    inputs = [torch.randn(n, 4) @ basis for _ in range(30)]
    data = [(x, (x @ teacher).argmax(1)) for x in inputs]
    damping = 1e-3

    a = data[0][0]
    factor = torch.cat([a, torch.ones(n, 1)], 1)
    factor = factor.T @ factor / n + damping * torch.eye(d + 1)
    assert torch.linalg.eigvalsh(factor.double()).min() > 0.5 * damping
    factor_bf16 = factor.to(torch.bfloat16)  # (torch has no bf16 inv/cholesky at all)
    # even inverting the bf16 factor in float32 fails: it is no longer positive definite
    _, info = torch.linalg.cholesky_ex(factor_bf16.float())
    assert info.item() > 0
    assert torch.linalg.eigvalsh(factor_bf16.double()).min() < 0

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 5))
    opt = SINGD(model, lr=0.01, damping=damping, T=1, lr_cov=0.05,
                preconditioner_dtype=(torch.bfloat16, torch.bfloat16))
    losses = train(model, opt, data)
    for key in ("Ks", "Cs", "m_Ks", "m_Cs"):
        for mat in getattr(opt, key).values():
            assert mat.flat.dtype == torch.bfloat16 and torch.isfinite(mat.flat).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-5:]) < 0.25 * sum(losses[:5])  # and it still learns


# --------------------------------------------------------------------------- grad scaling
def _scaled_training(opt_cls, scales, init_grad_scale):
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = opt_cls(model, init_grad_scale=init_grad_scale, **HYPER)
    for scale, (x, y) in zip(scales, batches(len(scales))):
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x), y) * scale).backward()
        # what torch.amp.GradScaler.step does for optimizers with _step_supports_amp_scaling
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        opt.step()
        del opt.grad_scale, opt.found_inf
    return model, opt


def test_grad_scaler_protocol_matches_official_and_unscaled(reference_singd):
    scales = [1024.0, 1024.0, 512.0, 512.0, 2048.0, 2048.0, 2048.0, 256.0] * 3
    model, opt = _scaled_training(SINGD, scales, 1024.0)
    assert_same_training(model, opt, *_scaled_training(reference_singd, scales, 1024.0))
    assert_same_training(model, opt, *_scaled_training(SINGD, [1.0] * len(scales), 1.0), rtol=1e-4)


def test_found_inf_skips_the_step_and_drops_statistics():
    model = mlp()
    opt = SINGD(model, T=1)
    before = [p.clone() for p in model.parameters()]
    x, y = classification_batch()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    with pytest.warns(UserWarning, match="inf"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(layer.tap.probe_K.grad is None for layer in opt._layers.values())
    assert opt.steps == 1
