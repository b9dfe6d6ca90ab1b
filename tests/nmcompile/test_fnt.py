"""FNT helper: the LR schedule's exact shape (LUQ §5.2), its LambdaLR form, and the phase options."""
import pytest
import torch

import nmcompile
from nmcompile.fnt import fnt_options, fnt_schedule, fnt_scheduler


@pytest.mark.parametrize("total", [1, 2, 7, 10, 100])
def test_schedule_endpoints_and_peak(total):
    lr_start, lr_base = 0.004, 0.1
    assert fnt_schedule(0, total, lr_start, lr_base) == pytest.approx(lr_start, abs=1e-15)
    assert fnt_schedule(total / 2, total, lr_start, lr_base) == pytest.approx(lr_base, abs=1e-15)
    assert fnt_schedule(total, total, lr_start, lr_base) == 0.0
    assert fnt_schedule(total + 5, total, lr_start, lr_base) == 0.0


def test_schedule_is_piecewise_linear_exactly():
    total, lr_start, lr_base = 100, 0.01, 0.2
    values = [fnt_schedule(s, total, lr_start, lr_base) for s in range(total + 1)]
    # ramp: constant positive increments of (lr_base - lr_start) / 50 over steps 0..50
    ramp = [b - a for a, b in zip(values[:50], values[1:51])]
    assert ramp == pytest.approx([(lr_base - lr_start) / 50] * 50, rel=1e-9)
    # decay: constant negative increments of -lr_base / 50 over steps 50..100
    decay = [b - a for a, b in zip(values[50:100], values[51:101])]
    assert decay == pytest.approx([-lr_base / 50] * 50, rel=1e-9)
    assert values[25] == pytest.approx((lr_start + lr_base) / 2)
    assert values[75] == pytest.approx(lr_base / 2)
    assert max(values) == pytest.approx(lr_base) and values.index(max(values)) == 50


def test_schedule_odd_total_peaks_between_steps():
    total, lr_start, lr_base = 7, 0.0, 1.0  # half = 3.5
    assert fnt_schedule(3, total, lr_start, lr_base) == pytest.approx(3 / 3.5)
    assert fnt_schedule(4, total, lr_start, lr_base) == pytest.approx(3 / 3.5)  # symmetric around 3.5
    assert fnt_schedule(6, total, lr_start, lr_base) == pytest.approx(1 / 3.5)


def test_schedule_ramps_down_when_start_exceeds_base():
    assert fnt_schedule(5, 20, 1.0, 0.5) == pytest.approx(0.75)


@pytest.mark.parametrize("bad", [dict(total=0), dict(total=2.5), dict(total=True), dict(step=-1),
                                 dict(lr_start=-0.1), dict(lr_base=-1.0)])
def test_schedule_rejects_bad_arguments(bad):
    kw = dict(step=0, total=10, lr_start=0.01, lr_base=0.1) | bad
    with pytest.raises(ValueError):
        fnt_schedule(**kw)


def test_lambda_lr_follows_the_schedule_after_an_earlier_scheduler():
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    earlier = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)  # sets initial_lr = 0.5
    opt.step()
    earlier.step()
    total, lr_start, lr_base = 12, 0.002, 0.05
    sched = fnt_scheduler(opt, total, lr_start, lr_base)
    seen = []
    for _ in range(total + 1):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([fnt_schedule(s, total, lr_start, lr_base) for s in range(total + 1)], abs=1e-12)
    assert seen[0] == pytest.approx(lr_start) and seen[6] == pytest.approx(lr_base) and seen[-1] == 0.0


def test_scheduler_needs_positive_base():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError):
        fnt_scheduler(opt, 10, 0.01, 0.0)


def test_fnt_options_switch_off_gradient_transforms_and_keep_forward():
    train = {"sparsity": "2:4", "method": "greedy", "gemms": ["wgrad", "dgrad"], "quant": "luq", "smp": 2,
             "bits": 4, "levels": "reference", "fwd_quant": "sawb", "fwd_bits": 4, "exclude": "head",
             "keep_first_last": False, "inner": "aot_eager"}
    out = fnt_options(train)
    assert out == {
        "fwd_quant": "sawb",
        "fwd_bits": 4,
        "exclude": "head",
        "keep_first_last": False,
        "inner": "aot_eager",
    }
    cfg, rest = nmcompile.NMConfig.from_options(out)
    assert cfg.sparsity is None and cfg.quant is None and cfg.fwd_quant == "sawb" and rest == {}
    assert train["quant"] == "luq"  # input not modified


def test_fnt_options_add_sawb_when_training_had_no_forward_quantization():
    assert fnt_options({"quant": "luq"}) == {"fwd_quant": "sawb"}
    assert fnt_options() == {"fwd_quant": "sawb"}


def test_fnt_options_reject_bad_carried_values():
    with pytest.raises(ValueError, match="fwd_bits"):
        fnt_options({"fwd_quant": "sawb", "fwd_bits": 3})


def test_fnt_phase_compiles_with_quantized_forward_and_plain_backward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)
    )
    x = torch.randn(16, 16)
    opts = fnt_options({"sparsity": "2:4", "quant": "luq", "fwd_quant": "sawb", "inner": "aot_eager"})
    report = nmcompile.explain(model, x, **opts)
    summary = report.summary()
    assert summary["sparse_flop_share"] == 0.0 and summary["luq_flop_share"] == 0.0
    assert any(any(t.startswith("sawb") for t in g.transforms) for g in report.forward)
    assert not any(t.startswith(("luq", "mvue", "greedy")) for g in report.gemms for t in g.transforms)
