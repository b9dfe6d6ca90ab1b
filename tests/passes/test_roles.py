"""explain() names every backward GEMM with its role and module."""
import pytest
import torch
import torch.nn as nn

import nmcompile
from nmcompile.backend import recording
from nmcompile.recipes import PRESETS
from tests.models import MLP, AddmmLayer, ConvNet, Encoder

AOT = {"inner": "aot_eager"}  # same pass, no code generation: fast


def roles(report, role=None):
    return sorted((g.module, g.role) for g in report.gemms if g.role != "fwd" and (role is None or g.role == role))


def test_mlp_roles_and_transforms():
    x = torch.randn(4, 12, 32, requires_grad=True)  # 3-D input: GEMMs on 48 tokens
    r = nmcompile.explain(MLP(), x, sparsity="2:4", quant="luq", **AOT)
    assert roles(r) == sorted([(f"fc{i}", role) for i in (1, 2, 3) for role in ("dgrad", "wgrad")])
    for g in r.backward:
        assert g.skipped is None
        if g.role == "wgrad":
            assert g.transforms == ["mvue 2:4 along K (tokens)", "luq4"] and g.shape[2] == 48
        else:
            assert g.transforms == ["luq4"]
    assert [g.module for g in r.forward] == ["fc1", "fc2", "fc3"]


def test_addmm_layer_gradient_is_the_right_operand():
    r = nmcompile.explain(AddmmLayer(), torch.randn(12, 16), sparsity="2:4", **AOT)
    (wgrad,) = r.backward
    assert (wgrad.role, wgrad.op, wgrad.shape) == ("wgrad", "mm", (16, 8, 12))
    assert wgrad.transforms == ["mvue 2:4 along K (tokens)"]


def test_conv_roles():
    r = nmcompile.explain(ConvNet(), torch.randn(2, 3, 8, 8), sparsity="2:4", gemms=["wgrad", "dgrad"], **AOT)
    assert roles(r) == sorted([("conv1", "wgrad"), ("conv2", "dgrad"), ("conv2", "wgrad"),
                               ("head", "dgrad"), ("head", "wgrad")])
    conv2 = {g.role: g for g in r.find(module="conv2")}
    assert conv2["dgrad"].transforms == ["mvue 2:4 along C_out"]
    assert conv2["wgrad"].transforms == ["mvue 2:4 along W (tokens)"]
    assert conv2["wgrad"].shape == (16, 72, 128)  # C_out x C_in·kh·kw x N·H·W


class GroupedConvNet(nn.Module):
    """A 16-channel stem, a grouped 3x3 convolution (``groups``), a 1x1 convolution and a head."""

    def __init__(self, groups: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=groups)
        self.point = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.point(torch.relu(self.grouped(torch.relu(self.stem(x))))))
        return self.head(x.mean((2, 3)))


def test_grouped_convolutions_prune_within_groups_and_report_the_per_group_reduction():
    x = torch.randn(2, 3, 8, 8)
    opts = dict(sparsity="2:4", gemms=["wgrad", "dgrad"], **AOT)
    for groups, k in ((16, 9), (2, 72), (4, 36)):
        grouped = {g.role: g for g in nmcompile.explain(GroupedConvNet(groups), x, **opts).find(module="grouped")}
        # dgrad: each input channel's gradient sums C_out/groups output channels × 3·3 kernel positions
        assert grouped["dgrad"].shape == (128, 16, k), groups
        assert grouped["wgrad"].shape == (16, k, 128) and grouped["wgrad"].transforms == ["mvue 2:4 along W (tokens)"]
        if groups == 16:  # depthwise: one output channel per input channel, nothing to prune
            assert grouped["dgrad"].transforms == [] and "depthwise" in grouped["dgrad"].notes[0]
        else:  # 8 or 4 output channels a group: groups of 4 along C_out never cross a conv group
            assert grouped["dgrad"].transforms == ["mvue 2:4 along C_out"] and not grouped["dgrad"].notes
    r = nmcompile.explain(GroupedConvNet(8), x, quant="luq", sparsity="2:4", gemms=["dgrad"], **AOT)
    (dgrad,) = r.find(module="grouped", role="dgrad")
    assert dgrad.transforms == ["luq4"] and "own 2 output channel(s)" in dgrad.notes[0]  # quantized, not pruned


def test_transformer_layer_roles_including_attention_bmm():
    x = torch.randn(2, 8, 32, requires_grad=True)
    r = nmcompile.explain(Encoder(), x, sparsity="2:4", gemms=["wgrad", "dgrad"], **AOT)
    bmms = [g for g in r.backward if g.op == "bmm"]
    # q @ kᵀ and p @ v multiply two activations: both sides of each are activation gradients, not updates
    assert len(bmms) == 4 and sorted(g.role for g in bmms) == ["act_lhs", "act_lhs", "act_rhs", "act_rhs"]
    assert all(g.module == "layer.self_attn" and not g.transforms and "gemms=" in g.skipped for g in bmms)
    assert all("both operands of its forward GEMM are activations" in g.role_why for g in bmms)
    linears = {(g.module, g.role) for g in r.backward if g.op == "mm"}
    assert linears == {
        (m, role) for m in ("layer.linear1", "layer.linear2", "layer.self_attn") for role in ("dgrad", "wgrad")
    }
    assert all(not g.skipped for g in r.backward if g.op == "mm")
    assert all("parameter" in g.role_why for g in r.backward if g.op == "mm")


def test_attention_roles_by_layout_agree_with_roles_by_size():
    """With T == head_dim sizes cannot tell the two sides apart; the layout walk must agree with the
    size rule used when T != head_dim."""

    def attention_roles(tokens):
        r = nmcompile.explain(
            Encoder(d=32, heads=4), torch.randn(2, tokens, 32, requires_grad=True), sparsity="2:4",
            gemms=["act_lhs", "act_rhs"], **AOT
        )
        return [(g.role, g.transforms) for g in r.backward if g.op == "bmm"]

    by_size = attention_roles(12)  # head_dim = 8: sizes decide
    assert sorted(role for role, _ in by_size) == ["act_lhs", "act_lhs", "act_rhs", "act_rhs"], by_size
    # named in gemms, each side is pruned along its own reduction
    assert {role: t for role, t in by_size} == {"act_lhs": ["mvue 2:4 along K (features)"],
                                                "act_rhs": ["mvue 2:4 along K (tokens)"]}
    assert attention_roles(8) == by_size  # T == head_dim: the layout walk decides


class Attention(nn.Module):
    """What a new user writes: a qkv Linear and ``softmax(q @ kᵀ) @ v``, then a projection."""

    def __init__(self, d=32):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1) @ v)


@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_no_default_recipe_compresses_attentions_activation_gradients(preset):
    # every layer compressed, whatever this CPU measures (dense_if_faster: tests/passes/test_speed.py)
    options = {**PRESETS[preset], "dense_if_faster": False} if preset else {"sparsity": "2:4"}
    x = torch.randn(2, 16, 32, requires_grad=True)
    r = nmcompile.explain(Attention(), x, **options, **AOT)
    bmms = [g for g in r.backward if g.op == "bmm"]
    assert sorted(g.role for g in bmms) == ["act_lhs", "act_lhs", "act_rhs", "act_rhs"]
    for g in bmms:  # a forward quantizer's codes of the other operand may be reused; the gradient is untouched
        assert not [t for t in g.transforms if t.spec.stage == "gradient"], (preset, g)
    updates = {g.module for g in r.backward if g.role == "wgrad"}
    assert updates == {"qkv", "proj"}
    for g in r.backward:
        if g.role in ("wgrad", "dgrad") and g.module == "qkv":
            assert any(t.spec.stage == "gradient" for t in g.transforms) == (
                "quant" in options or (g.role == "wgrad" and "sparsity" in options)), (preset, g)


def test_the_forward_gemms_of_two_activations_can_stay_in_high_precision():
    x = torch.randn(2, 16, 32)
    options = {"fwd_quant": "absmax", "fwd_bits": 8, "fwd_scales": "row", "keep_first_last": False, **AOT}
    torch.manual_seed(0)
    model = Attention()
    every = nmcompile.explain(model, x, **options)
    kept = nmcompile.explain(model, x, **options, fwd_act_gemms=False)
    for r, act in ((every, True), (kept, False)):
        forward = {(g.module, g.op): g for g in r.forward}
        assert all(bool(g.transforms) == act for (_, op), g in forward.items() if op == "bmm"), r
        assert all(g.transforms == ["absmax8/row W,X"] for (m, _), g in forward.items() if m in ("qkv", "proj"))
        # the backward GEMMs reuse a forward operand's rounded source only where the forward GEMM rounded it
        assert all(bool(g.transforms) == act for g in r.backward if g.op == "bmm"), r
    assert all("fwd_act_gemms=False" in g.skipped for g in kept.forward if g.op == "bmm")
    y = {}
    for act in (True, False):  # and the numbers follow: rounding q, kᵀ, p and v changes the output
        torch._dynamo.reset()
        y[act] = torch.compile(model, backend="nm", options={**options, "fwd_act_gemms": act})(x)
    assert not torch.equal(y[True], y[False])
    with pytest.raises(ValueError, match="fwd_act_gemms=1 must be True or False"):
        nmcompile.NMConfig(fwd_act_gemms=1)


def test_roles_without_parameters_and_with_a_frozen_weight():
    """A compiled function handed its weights as tensors: every input's gradient counts as a parameter's. A frozen
    weight (no gradient) still makes its GEMM's input side a dgrad."""
    w1, w2 = torch.randn(32, 32, requires_grad=True), torch.randn(32, 32, requires_grad=True)

    def f(x, w1, w2):
        h = x @ w1
        return torch.softmax(h @ h.transpose(-1, -2), -1) @ (h @ w2)

    compiled = torch.compile(f, backend="nm", options={"sparsity": "2:4", **AOT}, fullgraph=True)
    with recording() as records:
        compiled(torch.randn(2, 8, 32), w1, w2).sum().backward()
    backward = [g for g in records if g.role != "fwd"]
    # x needs no gradient: x @ w1 has its wgrad only; h @ w2 both sides; h @ hᵀ and p @ (h @ w2) are activations'
    assert sorted(g.role for g in backward if g.op == "mm") == ["dgrad", "wgrad", "wgrad"], backward
    assert sorted(g.role for g in backward if g.op == "bmm") == ["act_lhs", "act_lhs", "act_rhs", "act_rhs"], backward

    model = Attention()
    model.qkv.weight.requires_grad_(False)
    r = nmcompile.explain(model, torch.randn(2, 16, 32), sparsity="2:4", **AOT)
    assert sorted(g.role for g in r.backward if g.module == "qkv") == []  # no input gradient, no weight gradient
    assert sorted(g.role for g in r.backward if g.module == "proj") == ["dgrad", "wgrad"]
    model = Attention()
    model.proj.weight.requires_grad_(False)
    r = nmcompile.explain(model, torch.randn(2, 16, 32), sparsity="2:4", **AOT)
    (proj,) = r.find(module="proj", role="dgrad")
    assert "needs no gradient" in proj.role_why and not r.find(module="proj", role="wgrad")


def test_fused_attention_is_reported_not_rewritten():
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    r = nmcompile.explain(layer, torch.randn(2, 8, 32), sparsity="2:4", **AOT)
    (sdpa,) = [g for g in r.gemms if g.op == "sdpa"]
    assert "fused attention kernel" in sdpa.skipped and "SDPBackend.MATH" in sdpa.skipped


def test_include_exclude_and_keep_first_last():
    x = torch.randn(48, 32)
    r = nmcompile.explain(MLP(), x, sparsity="2:4", exclude=r"fc2", fwd_quant="sawb", **AOT)
    assert "exclude" in r.find("fc2", "wgrad")[0].skipped
    assert r.find("fc1", "wgrad")[0].transforms == ["mvue 2:4 along K (tokens)"]
    fwd = {g.module: g for g in r.forward}
    assert "keep_first_last" in fwd["fc1"].skipped and "keep_first_last" in fwd["fc3"].skipped
    assert "exclude" in fwd["fc2"].skipped
    r = nmcompile.explain(MLP(), x, fwd_quant="sawb", include="fc2", **AOT)
    assert r.find("fc2", "fwd")[0].transforms == ["sawb4 W,X"]
    assert r.find("fc2", "wgrad")[0].transforms == ["sawb4 X"] and r.find("fc2", "dgrad")[0].transforms == ["sawb4 W"]


def test_remainder_and_tiny_gemms_are_reported():
    r = nmcompile.explain(MLP((32, 16, 8, 4)), torch.randn(10, 32), sparsity="2:4", **AOT)
    wgrads = [g for g in r.backward if g.role == "wgrad"]
    assert len(wgrads) == 3
    for g in wgrads:
        assert g.transforms and "last 2 stay dense" in g.notes[0]
    r = nmcompile.explain(MLP((32, 16, 8, 4)), torch.randn(3, 32), sparsity="2:4", **AOT)
    wgrads = [g for g in r.backward if g.role == "wgrad"]
    assert len(wgrads) == 3
    for g in wgrads:
        assert not g.transforms and "reduction size 3 < M=4" in g.notes[0]


def test_report_json_round_trip():
    r = nmcompile.explain(MLP(), torch.randn(48, 32), sparsity="2:4", **AOT)
    data = __import__("json").loads(r.to_json())
    assert data["schema"] == "nmcompile.report/6" and data["options"]["sparsity"] == "2:4"
    assert data["summary"]["sparse_flop_share"] > 0 and len(data["gemms"]) == len(r.gemms)
    back = nmcompile.Report.from_json(r.to_json())
    assert back.gemms == r.gemms


def test_backward_of_a_high_precision_gemm_never_sees_quantized_operands():
    """h feeds fc2 (quantized) and head (last GEMM, kept in high precision): head's weight gradient
    must use the original h, fc2's the quantized one."""

    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3, self.head = (
                nn.Linear(16, 16),
                nn.Linear(16, 16),
                nn.Linear(16, 16),
                nn.Linear(16, 4),
            )

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            return self.fc3(torch.relu(self.fc2(h))).sum(-1, keepdim=True) + self.head(h)

    r = nmcompile.explain(Fork(), torch.randn(8, 16), fwd_quant="sawb", **AOT)
    assert r.find("fc2", "wgrad")[0].transforms == ["sawb4 X"]
    assert r.find("head", "wgrad")[0].transforms == [] and "keep_first_last" in r.find("head", "fwd")[0].skipped


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class _TinyLM(nn.Module):
    """An embedding (a lookup: the first layer, no GEMM), three blocks, and a head (the last layer)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.blocks = nn.ModuleList(_Block() for _ in range(3))
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 50)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _forward_decisions(compile_model, model, inputs):
    torch._dynamo.reset()
    compiled = compile_model(model)
    with nmcompile.backend.recording() as records:
        compiled(*inputs).float().pow(2).mean().backward()
    return [(r.graph, r.module, r.skipped or ", ".join(map(str, r.transforms))) for r in records if r.role == "fwd"]


def test_keep_first_last_means_the_models_layers_across_graph_breaks():
    """A graph break splits the model in two graphs; only the model's first (a) and last (d) layer are kept, each
    record saying which layer of which model, and the GEMMs next to the break (b, c) are quantized."""

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            x = self.b(torch.relu(self.a(x)))
            torch._dynamo.graph_break()
            return self.d(torch.relu(self.c(x)))

    options = {"fwd_quant": "sawb", **AOT}
    got = _forward_decisions(lambda m: torch.compile(m, backend="nm", options=options), Broken(),
                             (torch.randn(8, 16),))
    assert got == [(0, "a", "first layer of the model (Broken.a) kept in high precision (keep_first_last=True)"),
                   (0, "b", "sawb4 W,X"), (1, "c", "sawb4 W,X"),
                   (1, "d", "last layer of the model (Broken.d) kept in high precision (keep_first_last=True)")]


def test_keep_first_last_is_the_same_compiled_whole_or_block_by_block():
    """Per-block compilation (one graph that every block reuses) quantizes what compiling the whole model
    quantizes: all the blocks' GEMMs; the embedding is the first layer and the head, the last, is kept."""
    options = {"quant": "luq", "fwd_quant": "sawb", **AOT}
    model, tokens = _TinyLM(), torch.randint(0, 50, (2, 8))

    def per_block(m):
        for block in m.blocks:
            block.compile(backend="nm", options=options)
        return m

    blocks = _forward_decisions(per_block, model, (tokens,))
    assert blocks == [(0, "up", "sawb4 W,X"), (0, "down", "sawb4 W,X")]  # one graph, shared by the 3 blocks
    model = _TinyLM()
    whole = _forward_decisions(lambda m: torch.compile(m, backend="nm", options=options), model, (tokens,))
    assert whole[:-1] == [(0, f"blocks.{i}.{name}", "sawb4 W,X") for i in range(3) for name in ("up", "down")]
    assert whole[-1] == (0, "head", "last layer of the model (_TinyLM.head) kept in high precision "
                                    "(keep_first_last=True)")


def test_keep_first_last_under_autocast_keeps_the_head_through_autocasts_cast_in_bf16():
    """Under bf16 autocast the head's weight reaches its GEMM through a cast to bf16: it is still the model's last
    layer, kept in high precision, which under autocast is bf16 (as Inductor alone would run it), not fp32."""
    options = {"quant": "luq", "fwd_quant": "sawb", **AOT}
    model, tokens = _TinyLM(), torch.randint(0, 50, (2, 8))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="nm", options=options)
    with nmcompile.backend.recording() as records, torch.autocast("cpu", torch.bfloat16):
        compiled(tokens).float().pow(2).mean().backward()
    head = [r for r in records if r.module == "head"]
    assert head and all(r.dtype == "bfloat16" and not any("sawb" in str(t) for t in r.transforms) for r in head), head
    assert [r.skipped for r in head if r.role == "fwd"] == [
        "last layer of the model (_TinyLM.head) kept in high precision (keep_first_last=True)"]
    blocks = [r for r in records if r.module.startswith("blocks.") and r.role == "fwd"]
    assert len(blocks) == 6 and all(str(r.transforms[0]) == "sawb4 W,X" for r in blocks), blocks


def test_keep_first_last_without_a_model_keeps_each_graphs_own_and_says_why():
    """A compiled function whose parameters belong to no module running when it compiles: the graph's own first
    and last forward GEMM are kept, and the records say why."""
    a, b, c = (nn.Linear(16, 16) for _ in range(3))
    options = {"fwd_quant": "sawb", **AOT}
    got = _forward_decisions(lambda f: torch.compile(f, backend="nm", options=options),
                             lambda x: c(torch.relu(b(torch.relu(a(x))))), (torch.randn(8, 16),))
    assert [d for _, _, d in got][1] == "sawb4 W,X"
    for (_, _, reason), which in zip(got[::2], ("first", "last")):
        assert reason == (f"{which} forward GEMM of graph 0 kept in high precision (keep_first_last=True; its "
                          "parameters belong to no module running when it compiled, so each graph keeps its own)")
