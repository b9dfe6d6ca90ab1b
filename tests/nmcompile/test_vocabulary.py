"""The typed vocabulary: roles, LUQ levels, code formats, CPU uses, lowerings and compilers are str enums that the
pass, the records and the report hold, while options, JSON and the graph's op arguments keep their plain strings."""
import enum
import json

import pytest
import torch

from nmcompile.kernels.catalog import OPS
from nmcompile.kernels.gemm import DENSE, KERNELS, Codes, CpuUse, KernelUse, Lowering
from nmcompile.kernels.luq import LEVEL_KINDS, Levels
from nmcompile.passes.config import NMConfig, Inner
from nmcompile.passes.records import GemmRecord, NodeInfo, Transform
from nmcompile.passes.roles import BACKWARD_ROLES, ROLES, Role, is_update
from nmcompile.report import Report

VOCABULARIES = (Role, Levels, Codes, CpuUse, Lowering, Inner)


@pytest.mark.parametrize("vocabulary", VOCABULARIES, ids=lambda v: v.__name__)
def test_a_member_reads_as_its_value_everywhere(vocabulary):
    for member in vocabulary:
        value = member.value
        assert member == value and hash(member) == hash(value) and {value: 1}[member] == 1
        assert str(member) == f"{member}" == f"{member:s}" == value and type(str(member)) is str
        assert json.dumps({member: [member]}) == json.dumps({value: [value]})
        assert vocabulary(value) is member
    with pytest.raises(ValueError):
        vocabulary("no such value")


def test_the_roles_table():
    assert [r.value for r in Role] == ["fwd", "wgrad", "dgrad", "act_lhs", "act_rhs", "?"]
    assert ROLES == {r.value: r for r in Role}
    assert BACKWARD_ROLES == (Role.WGRAD, Role.DGRAD, Role.ACT_LHS, Role.ACT_RHS)
    assert [r for r in Role if r.update] == [Role.WGRAD] and is_update("wgrad") and not is_update("?")
    assert [r for r in Role if r.quantized] == [Role.WGRAD, Role.DGRAD]  # activation gradients: only where named
    assert all(r.meaning and r.style for r in Role)
    assert {r.other for r in BACKWARD_ROLES} == {"X", "W", "A", "B"}  # each side names its forward operand


def test_a_config_holds_members_and_gives_plain_strings():
    cfg = NMConfig(quant="luq", gemms=["dgrad", "wgrad", "dgrad"], levels="reference", lowering="emulate",
                   inner="aot_eager")
    assert cfg.gemms == (Role.DGRAD, Role.WGRAD) and all(type(r) is Role for r in cfg.gemms)
    assert (cfg.levels, cfg.lowering, cfg.inner) == (Levels.REFERENCE, Lowering.EMULATE, Inner.AOT_EAGER)
    assert all(isinstance(v, (Levels, Lowering, Inner)) for v in (cfg.levels, cfg.lowering, cfg.inner))
    plain = cfg.as_dict()
    assert plain["gemms"] == ["dgrad", "wgrad"] and plain["levels"] == "reference" and plain["lowering"] == "emulate"
    assert all(type(v) is str for v in (*plain["gemms"], plain["levels"], plain["lowering"], plain["inner"]))
    assert NMConfig(**plain) == cfg and NMConfig(**cfg.options()) == cfg
    # Inductor writes a graph's op arguments into Python source with repr: they must be plain strings
    params = cfg.params_for(OPS["luq"])
    assert type(params["levels"]) is str and repr(params["levels"]) == "'reference'"


@pytest.mark.parametrize("key, value, allowed", [
    ("gemms", ["wgrad", "qgrad"], "'wgrad', 'dgrad', 'act_lhs', 'act_rhs'"),
    ("levels", "loose", "'strict', 'reference'"),
    ("lowering", "fast", "'auto', 'emulate', 'native'"),
    ("inner", "eager", "'inductor', 'aot_eager'"),
])
def test_a_bad_value_is_named_with_the_plain_choices(key, value, allowed):
    with pytest.raises(ValueError) as err:
        NMConfig(**{key: value})
    assert allowed in str(err.value) and "<" not in str(err.value)  # no enum reprs in a user's error


def test_records_write_plain_json_and_read_back_typed():
    use = KERNELS["int8"].use((torch.int8, torch.int8), torch.device("cpu"), torch.float32)
    luq = Transform("luq", {"bits": 4, "levels": "strict", "samples": 1})
    rec = GemmRecord(0, "mm", "mm", Role.DGRAD, "fc", (64, 64, 64), "float32", [luq], kernel=use)
    text = json.dumps({"schema": "nmcompile.report/6", "gemms": [rec.as_dict()], "options": {}, "torch": "x"})
    d = json.loads(text)["gemms"][0]
    assert d["role"] == "dgrad" and d["kernel"] == "int8" and d["kernel_use"]["kernel"] == "int8"
    back = Report.from_json(text).gemms[0]
    assert back.role is Role.DGRAD and isinstance(back.kernel, KernelUse) and back.kernel.native


@pytest.mark.parametrize("label, kernel", [("dense", "dense"), ("fp8 e4m3", "fp8"), ("fp8 e5m2×e4m3", "fp8"),
                                           ("int8", "int8"), ("2:4 cusparselt bf16", "2:4"),
                                           ("2:4 cusparselt fp8", "2:4 fp8"), ("2:4 cpu fp16", "2:4")])
def test_an_old_reports_kernel_label_names_its_kernel(label, kernel):
    use = KernelUse.from_label(label)
    assert use == label and use.kernel == kernel and use.native == (KERNELS[kernel] is not DENSE)


def test_a_label_that_names_no_kernel_is_refused():
    with pytest.raises(ValueError, match=r"kernel label 'fp4' names no kernel; kernels: 2:4 fp8, fp8, int8"):
        KernelUse.from_label("fp4")


def test_a_node_carries_a_tuple_of_ops():
    info = NodeInfo(("mvue", "luq"), "mm_1", "fc", Role.WGRAD)
    assert info.op[0] == "mvue" and info.label == "mvue+luq"
    for bad in ("mvue+luq", (), ("mvue", 3)):
        with pytest.raises(TypeError, match="NodeInfo.op must be a non-empty tuple of op names"):
            NodeInfo(bad)


def test_no_vocabulary_is_a_plain_enum():
    # a plain Enum would print as "Role.WGRAD" in reports and fail to compare equal to what JSON holds
    assert all(issubclass(v, str) and issubclass(v, enum.Enum) for v in VOCABULARIES)
    assert LEVEL_KINDS == tuple(Levels)
