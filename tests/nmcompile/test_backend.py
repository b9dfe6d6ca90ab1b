"""The user contract of the backend: registration, options, mode, cache keys."""
import subprocess
import sys
import textwrap

import pytest
import torch

import nmcompile
from nmcompile.backend import nm_backend
from nmcompile.passes.config import NMConfig
from nmcompile.passes.joint_pass import NMJointPass


def test_fresh_process_uses_backend_without_importing_nmcompile():
    script = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        f = torch.compile(m, backend="nm", options={"sparsity": "2:4", "inner": "aot_eager"})
        f(torch.randn(32, 16)).sum().backward()
        assert m[0].weight.grad is not None and torch.isfinite(m[0].weight.grad).all()
        print("nmcompile imported by user:", "nmcompile" in sys.modules and "via entry point")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "via entry point" in out.stdout  # the entry point loaded it; the script never imported it


@pytest.mark.parametrize("options,message", [
    ({"sparsity": "3:2"}, "sparsity='3:2' is not a valid N:M pattern"),
    ({"sparsity": "2-4"}, "sparsity='2-4'"),
    ({"method": "topk"}, "method='topk' is not allowed; choose one of 'mvue', 'greedy'"),
    ({"gemms": ["wgrad", "fwd"]}, "gemms='fwd'"),
    ({"quant": "fp4"}, "quant='fp4'"),
    ({"bits": 1}, "bits=1 is not allowed; use an integer in 2..8"),
    ({"fwd_bits": 8}, "fwd_bits=8 is not allowed; use an integer in 4"),
    ({"levels": "loose"}, "levels='loose'"),
    ({"smp": 0}, "smp=0"),
    ({"include": "fc(["}, "include='fc([' is not a valid regular expression"),
    ({"inner": "eager"}, "inner='eager'"),
    ({"sparsty": "2:4"}, "unknown option 'sparsty'; nm options are sparsity, method"),
])
def test_bad_options_fail_at_compile_time_naming_key_and_value(options, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        NMConfig.from_options(options)
    model = torch.nn.Linear(8, 4)
    with pytest.raises(Exception, match=__import__("re").escape(message)):
        torch.compile(model, backend="nm", options=options)(torch.randn(4, 8))


def test_inductor_settings_pass_through_and_mode_reaches_inductor(monkeypatch):
    import torch._inductor.compile_fx as cfx

    seen = {}
    real = cfx.compile_fx

    def spy(gm, inputs, config_patches=None, **kw):
        seen.update(config_patches or {})
        return real(gm, inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    f = torch.compile(torch.nn.Linear(8, 4), backend=nm_backend, mode="max-autotune-no-cudagraphs")
    f(torch.randn(4, 8))
    assert seen.get("max_autotune") is True and isinstance(seen["joint_custom_pre_pass"], NMJointPass)
    seen.clear()
    torch._dynamo.reset()
    f = torch.compile(torch.nn.Linear(8, 4), backend=nm_backend, options={"sparsity": "2:4", "epilogue_fusion": False})
    f(torch.randn(4, 8))
    assert seen["epilogue_fusion"] is False and seen["joint_custom_pre_pass"].config.sparsity == "2:4"


def test_uuid_covers_the_options():
    a = NMJointPass(NMConfig(sparsity="2:4")).uuid()
    assert a == NMJointPass(NMConfig(sparsity="2:4")).uuid()
    assert a != NMJointPass(NMConfig(sparsity="1:2")).uuid()
    assert a != NMJointPass(NMConfig(sparsity="2:4", gemms=["wgrad", "dgrad"])).uuid()
    assert a != NMJointPass(NMConfig(sparsity="2:4"), decompose=False).uuid()


def test_explain_leaves_gradients_and_buffers_alone():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 4))
    x = torch.randn(16, 8)
    model(x).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    stats = model[1].running_mean.clone()
    report = nmcompile.explain(model, x, sparsity="2:4", inner="aot_eager")
    assert report.backward and all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    assert torch.equal(stats, model[1].running_mean)


def test_explain_backpropagates_loss_attribute_or_sum_of_outputs():
    class WithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            y = self.fc(x)
            return {"loss": y.pow(2).mean(), "logits": y, "ids": torch.ones(2, dtype=torch.long)}

    r = nmcompile.explain(WithLoss(), torch.randn(8, 8), sparsity="1:2", inner="aot_eager")
    assert [g.role for g in r.backward] == ["wgrad"]
    with pytest.raises(ValueError, match="nothing to backpropagate"):
        nmcompile.explain(torch.nn.Identity(), torch.randn(3), inner="aot_eager")


def users_pass(calls: list):
    """A user's own joint pass: records how many nm nodes it sees (0: it ran before ours)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Theirs(CustomGraphPass):
        def __call__(self, graph):
            calls.append(sum(1 for n in graph.nodes if "nm" in n.meta))

        def uuid(self):
            return "theirs-v1"

    return Theirs()


def test_a_user_joint_pass_still_runs_before_ours():
    from nmcompile.backend import recording

    calls = []
    with (
        torch._inductor.config.patch(joint_custom_pre_pass=users_pass(calls), force_disable_caches=True),
        recording() as records,
    ):
        model = torch.nn.Linear(8, 4)
        torch.compile(model, backend="nm", options={"sparsity": "2:4"})(torch.randn(8, 8)).sum().backward()
    assert calls == [0] and records and records[-1].transforms  # theirs ran (first), ours too


class _NoGradThenTrain(torch.nn.Module):
    """Dynamo graph 0 runs without autograd (an inference graph: no joint graph, no records); graph 1 trains."""

    def __init__(self):
        super().__init__()
        self.pre, self.fc = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        with torch.no_grad():
            h = torch.relu(self.pre(x))
        torch._dynamo.graph_break()
        return self.fc(h)


def test_records_and_captured_graphs_share_one_numbering():
    from nmcompile.backend import recording
    from nmcompile.capture import run_captured

    torch.manual_seed(0)
    run = run_captured(_NoGradThenTrain(), (torch.randn(8, 8),), {"sparsity": "2:4"})
    assert [g.joint is None for g in run.graphs] == [True, False]
    assert run.records and {r.graph for r in run.records} == {1}
    for r in run.records:  # each record names a node of the graph it says it belongs to
        assert r.node in {n.name for n in run.graphs[r.graph].joint.graph.nodes}
    with recording() as records:
        torch.compile(_NoGradThenTrain(), backend="nm", options={"sparsity": "2:4"})(torch.randn(8, 8)).sum().backward()
    assert records and {r.graph for r in records} == {1}, "Dynamo's second graph, after an inference graph"


def test_the_cli_capture_runs_a_user_joint_pass_too():
    from nmcompile.capture import run_captured

    calls = []
    with torch._inductor.config.patch(joint_custom_pre_pass=users_pass(calls)):
        run = run_captured(torch.nn.Linear(8, 4), (torch.randn(8, 8),), {"sparsity": "2:4"})
    assert calls == [0] and run.records[-1].transforms  # theirs ran (first), then ours


def test_options_from_the_environment_for_frameworks_that_pass_a_backend_name_only(monkeypatch, capsys):
    """NMCOMPILE_OPTIONS (a JSON object or a preset) gives the options; those given to torch.compile
    override it key by key; a bad value fails with the variable's name, and using it is said once."""
    from nmcompile.recipes import PRESETS, environment_options

    assert environment_options({}) == {}
    assert environment_options({"NMCOMPILE_OPTIONS": "luq4+absmax8"}) == PRESETS["luq4 + absmax8"]  # spaces aside
    assert environment_options({"NMCOMPILE_OPTIONS": "2:4"}) == PRESETS["mvue 2:4"] == {"sparsity": "2:4"}  # alias
    assert environment_options({"NMCOMPILE_OPTIONS": "2:4+luq4"}) == {"sparsity": "2:4", "quant": "luq"}
    assert environment_options({"NMCOMPILE_OPTIONS": "int8, row sr8"})["scales"] == "row"  # any recipe
    assert environment_options({"NMCOMPILE_OPTIONS": ' {"sparsity": "1:2"} '}) == {"sparsity": "1:2"}
    with pytest.raises(ValueError, match=r"NMCOMPILE_OPTIONS='luq' is neither a recipe's name "
                                         r"\(presets: mvue 2:4, luq4, .*\) nor JSON"):
        environment_options({"NMCOMPILE_OPTIONS": "luq"})
    with pytest.raises(ValueError, match="must be a JSON object of options or a recipe's name"):
        environment_options({"NMCOMPILE_OPTIONS": '["2:4"]'})

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(8, 16)

    def transforms(options=None) -> set:
        torch._dynamo.reset()
        with nmcompile.backend.recording() as records:
            torch.compile(model, backend="nm", options=options)(x).sum().backward()
        return {str(t) for r in records for t in r.transforms}

    monkeypatch.setenv("NMCOMPILE_OPTIONS", '{"sparsity": "2:4", "quant": "luq"}')
    assert transforms() == {"mvue 2:4 along K (tokens)", "luq4"}
    assert capsys.readouterr().err.count('backend options from NMCOMPILE_OPTIONS: {"sparsity": "2:4"') == 1
    assert transforms({"sparsity": "1:2"}) == {"mvue 1:2 along K (tokens)", "luq4"}  # the dict wins, key by key
    monkeypatch.setenv("NMCOMPILE_OPTIONS", '{"sparsity": "3:2"}')
    with pytest.raises(Exception, match=r"sparsity='3:2' is not a valid N:M pattern.*options from NMCOMPILE_OPTIONS"):
        transforms()
    monkeypatch.delenv("NMCOMPILE_OPTIONS")
    assert transforms() == set()  # unset: no options, nothing compressed
