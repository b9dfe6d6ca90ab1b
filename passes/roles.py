"""What each GEMM of a training step is for, and how the joint graph tells it.

A forward GEMM ``C = A @ B`` has two backward GEMMs, ``dA = dC @ Bᵀ`` (reduced over C's features) and
``dB = Aᵀ @ dC`` (reduced over C's rows, the tokens). Which side a backward GEMM is comes from its
contraction (``analysis.matmul_role``). What it *is* comes from where its output goes:

- its output is a parameter's gradient (followed through views, casts, sums and accumulation to the
  joint graph's gradient outputs): ``wgrad``, an update GEMM, whose error the optimizer averages away;
- the other side of such a GEMM, the gradient of the layer's input: ``dgrad``, which propagates;
- both sides of a GEMM of two activations (``q @ kᵀ``, ``p @ v`` in attention): ``act_lhs`` and
  ``act_rhs``. Both produce activation gradients that flow into every layer below, so no default
  compresses them: neither N:M pruning nor a gradient quantizer touches them unless ``gemms`` names them.
"""
from __future__ import annotations

import enum
from typing import Optional

import torch
import torch.fx as fx

from .analysis import LAYOUT_OPS, MATMULS, cast_source, is_tangent, matmul_operands, matmul_role, val

aten, prims = torch.ops.aten, torch.ops.prims


class Role(str, enum.Enum):
    """What a GEMM of a training step is for: one entry per role, with what the rest of the pass needs to
    know about it. A str: compares equal to, and is written in JSON and reports as, its value."""

    FWD = ("fwd", False, False, "", "", "cyan", "a forward GEMM")
    WGRAD = ("wgrad", True, True, "K (tokens)", "X", "magenta",
             "gradient of a parameter, Xᵀ · gy, summed over the tokens: an update")
    DGRAD = ("dgrad", False, True, "K (features)", "W", "green",
             "gradient of a layer's input, gy · Wᵀ: propagates to the layers below")
    ACT_LHS = ("act_lhs", False, False, "K (features)", "B", "yellow",
               "gradient of the left operand of a GEMM of two activations (dq of q @ kᵀ, dp of p @ v): propagates")
    ACT_RHS = ("act_rhs", False, False, "K (tokens)", "A", "yellow",
               "gradient of the right operand of a GEMM of two activations (dk of q @ kᵀ, dv of p @ v): propagates")
    UNKNOWN = ("?", False, False, "", "", "red", "not decided from the graph: left unchanged, and says why")

    update: bool  # its output is a parameter's gradient (the optimizer applies it; it does not propagate)
    quantized: bool  # a gradient quantizer (``quant``) compresses it without ``gemms`` naming it
    reduces: str  # what the gradient operand is reduced over, as records print it
    other: str  # the forward operand the GEMM's other side is, as the forward quantizer's records name it
    style: str  # its colour in tables
    meaning: str

    def __new__(cls, value: str, update: bool, quantized: bool, reduces: str, other: str, style: str, meaning: str):
        member = str.__new__(cls, value)
        member._value_ = value
        member.update, member.quantized, member.reduces, member.other = update, quantized, reduces, other
        member.style, member.meaning = style, meaning
        return member

    __str__ = str.__str__


ROLES: dict = {r.value: r for r in Role}  # by name, as options, records and JSON spell it
BACKWARD_ROLES = tuple(r for r in Role if r not in (Role.FWD, Role.UNKNOWN))


def is_update(role: str) -> bool:
    """A GEMM of this role computes a parameter's gradient (what the monitor and the switch measure)."""
    return role in ROLES and ROLES[role].update


# Ops through which a GEMM's output is still (a view, a cast, a part of a sum of) the same gradient.
_SAME_GRADIENT = LAYOUT_OPS | {
    aten.add.Tensor, aten.sum.dim_IntList, aten._to_copy.default, prims.convert_element_type.default,
    aten.expand.default, aten.squeeze.dim, aten.unsqueeze.default,
}


class GraphRoles:
    """The role of each backward GEMM (mm, bmm, addmm) of one joint graph and why, decided before the rewrite
    changes any operand; a GEMM whose role cannot be decided is left unchanged and says why.

    ``parameters``: indices of the graph inputs that are parameters (the joint graph's primals are the
    Dynamo graph's inputs, in order); None when they are not known, and then every input's gradient counts
    as a parameter's (a compiled function handed its weights as tensors).
    """

    def __init__(self, graph: fx.Graph, parameters: Optional[frozenset], grads: set, partners: dict):
        primals = [n for n in graph.nodes if n.op == "placeholder" and not is_tangent(n)]
        outputs = list(next(n for n in graph.nodes if n.op == "output").args[0])
        input_grads = outputs[len(outputs) - len(primals):] if len(outputs) >= len(primals) else []
        self.grads, self.partners = grads, partners
        self._param_primals = {p for i, p in enumerate(primals) if parameters is None or i in parameters}
        self._param_grads = {g: i for i, g in enumerate(input_grads)
                             if isinstance(g, fx.Node) and (parameters is None or i in parameters)}
        by_seq: dict = {}  # seq_nr -> the backward matmuls that differentiate one forward GEMM
        for node in graph.nodes:
            if node.op == "call_function" and node.target in MATMULS and node in grads:
                by_seq.setdefault(node.meta.get("seq_nr"), []).append(node)
        # All decided now, while every operand is still the graph's own: each GEMM's side first, then the
        # wgrad sides (where their output goes), then the dgrad sides (from their siblings' roles).
        sides = {n: self._guarded(self._side, n) for nodes in by_seq.values() for n in nodes}
        self._roles: dict = {}
        for node, side in sides.items():
            if side is not None and side[0] != Role.DGRAD:
                self._roles[node] = self._guarded(self._role_of_wgrad_side, node, *side)[:2]
        for node, side in sides.items():
            if side is not None and side[0] == Role.DGRAD:
                siblings = [s for s in by_seq[node.meta.get("seq_nr")] if s is not node]
                self._roles[node] = self._guarded(self._role_of_dgrad_side, node, siblings, *side)[:2]

    def __getitem__(self, node: fx.Node) -> tuple:
        """(role, why) of a backward GEMM with one gradient operand; (None, why) when its side is not known."""
        return self._roles.get(node, (None, "not a backward GEMM with one gradient operand"))

    @staticmethod
    def _guarded(decide, *args):
        """``decide(*args)``; an error becomes an unknown side or role that says why (the pass never fails a
        user's compile)."""
        try:
            return decide(*args)
        except Exception as err:  # noqa: BLE001
            return None, f"role not understood ({type(err).__name__}: {err})", None

    def _side(self, node: fx.Node) -> Optional[tuple]:
        """(side, how, the other operand) of a GEMM with one gradient operand, else None."""
        left, right = matmul_operands(node)
        if val(left) is None or val(right) is None or (left in self.grads) == (right in self.grads):
            return None
        grad_left = left in self.grads
        side, how = matmul_role(node, grad_left, self.partners.get(node.meta.get("seq_nr")))
        return Role(side) if side is not None else None, how, right if grad_left else left

    def _role_of_wgrad_side(self, node: fx.Node, side: Optional[str], how: str, other) -> tuple:
        if side is None:
            return None, how
        target = self._parameter_gradient(node)
        if target is not None:
            return Role.WGRAD, f"reduces over tokens ({how}); its output is the gradient of parameter input {target}"
        return Role.ACT_RHS, (f"reduces over tokens ({how}), but its output is an activation's gradient (it "
                              "reaches no parameter's gradient): both operands of its forward GEMM are activations")

    def _role_of_dgrad_side(self, node: fx.Node, siblings: list, side: str, how: str, other) -> tuple:
        if any(self[s][0] == Role.WGRAD for s in siblings):
            return Role.DGRAD, (f"reduces over features ({how}); the other side of its forward GEMM is a "
                                "parameter's gradient")
        if self.is_parameter(other):
            return Role.DGRAD, (f"reduces over features ({how}); its other operand is a parameter (one that needs "
                                "no gradient)")
        return Role.ACT_LHS, (f"reduces over features ({how}), times an activation: both operands of its forward "
                              "GEMM are activations")

    def _parameter_gradient(self, node: fx.Node) -> Optional[int]:
        """The input index whose (parameter) gradient ``node``'s output is, following it through ops that keep
        it the same gradient; None if it becomes none."""
        frontier, seen = [node], {node}
        while frontier:
            n = frontier.pop()
            if n in self._param_grads:
                return self._param_grads[n]
            for user in n.users:
                if user not in seen and user.op == "call_function" and user.target in _SAME_GRADIENT:
                    seen.add(user)
                    frontier.append(user)
        return None

    def is_parameter(self, operand) -> bool:
        """``operand`` is a parameter of the model (through its layout, and its cast under autocast)."""
        operand = cast_source(operand)  # the same weight through the forward's cast under autocast and its layout
        return isinstance(operand, fx.Node) and operand in self._param_primals


def parameter_inputs(example_inputs) -> Optional[frozenset]:
    """Indices of a Dynamo graph's inputs that are ``nn.Parameter``s; None when there are none to tell by."""
    found = frozenset(i for i, t in enumerate(example_inputs or ()) if isinstance(t, torch.nn.Parameter))
    return found or None
