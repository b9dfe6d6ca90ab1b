"""How much noise the gradient compression adds, per rewritten backward GEMM, next to the gradient itself
and the minibatch's own noise.

For a backward GEMM G = A·B whose gradient operand the pass compresses (Ĝ = Â·B, Â = mvue/greedy/luq of A),
with k independent draws Ĝ₁…Ĝ_k (k = ``draws``; the first from torch's generator as in a step) and their mean Ḡ:

- ``signal`` = ‖G‖²_F, the exact (uncompressed) output, from the same operands;
- ``compression_noise`` = mean ‖Ĝᵢ − G‖², an unbiased estimate of E‖Ĝ − G‖²_F = variance + bias²;
- ``compression_variance`` = Σ‖Ĝᵢ − Ḡ‖²/(k − 1) (½‖Ĝ₁ − Ĝ₂‖² for k = 2): an unbiased estimate of
  E‖Ĝ − EĜ‖² that needs no closed form;
- ``compression_bias`` = ‖Ḡ − G‖² − compression_variance/k, an unbiased estimate of ‖EĜ − G‖² (≈ 0 for
  MVUE and LUQ, whose noise is all variance; all of greedy's, whose "draws" are identical);
- ``minibatch_noise`` (update GEMMs, which sum over the batch): with the rows summed over split into halves
  of a and b rows, G = G_A + G_B and ‖b·G_A − a·G_B‖²/(a·b) is an unbiased estimate of the minibatch
  variance E‖G − ∇‖² when the halves' rows are independent samples (for a batch-major [B, T, ·] input and
  an even B, the halves are halves of the batch).

The measurement runs its own forward and backward (``inner="aot_eager"``, ``lowering="emulate"``: the
values a native kernel computes too) under ``torch.random.fork_rng``, takes the gradients with
``torch.autograd.grad`` and restores the module's buffers, so a training step's gradients and RNG stream
are the same with or without it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import operator
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from nmcompile.kernels.catalog import Stage, ops_of, spec_of
from nmcompile.passes.records import NodeInfo
from nmcompile.passes.roles import BACKWARD_ROLES, Role, is_update

aten = torch.ops.aten
SCHEMA = "nmcompile.noise/1"
STALL_FACTOR = 3.0  # Chmiel et al. 2025: training stalls once ‖∇L‖² < 3·σ_q²·d


def stall_ratio(gradient: float, compression_noise: float) -> Optional[float]:
    """gradient / (3·compression_noise), the stall criterion's ratio (below 1 training stalls): ``gradient`` the
    squared norm of the exact update less its minibatch variance, both summed over the GEMMs (and measurements)
    considered; None without compression noise. The one home of the formula: the monitor, PrecisionSwitch and the
    tools read it here."""
    return gradient / (STALL_FACTOR * compression_noise) if compression_noise > 0 else None


def windowed_stall_ratio(measurements: Sequence[tuple[float, float]], window: int) -> Optional[float]:
    """The stall ratio of the last ``window`` of ``measurements`` ((gradient, compression noise) pairs, oldest
    first), both summed over them: what PrecisionSwitch decides on and the long runs plot (window 1: the last
    measurement alone)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} must be a positive integer number of measurements")
    recent = measurements[-window:]
    return stall_ratio(sum(g for g, _ in recent), sum(n for _, n in recent))


@dataclasses.dataclass
class GemmNoise:
    """The noise measured at one rewritten backward GEMM (squared Frobenius norms of its output)."""

    graph: int
    node: str
    module: str
    role: str
    transforms: list
    signal: float
    compression_noise: float  # E‖Ĝ − G‖² = variance + bias²
    compression_variance: float
    compression_bias: float
    minibatch_noise: Optional[float] = None
    note: Optional[str] = None  # why a quantity is missing

    @property
    def noise_to_signal(self) -> Optional[float]:
        return self.compression_noise / self.signal if self.signal > 0 else None

    @property
    def noise_to_minibatch(self) -> Optional[float]:
        if self.minibatch_noise is None or self.minibatch_noise <= 0:
            return None
        return self.compression_noise / self.minibatch_noise

    @property
    def stall_ratio(self) -> Optional[float]:
        """(signal − minibatch_noise) / (3·compression_noise): an estimate of ‖∇L‖²/(3σ_q²d) for this
        weight gradient; Chmiel et al. 2025 ("FP4 All the Way") predict stalling below 1 (their σ_q² is an
        unbiased quantizer's variance; here it is the whole error, bias included)."""
        if self.minibatch_noise is None:
            return None
        return stall_ratio(self.signal - self.minibatch_noise, self.compression_noise)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(noise_to_signal=self.noise_to_signal, noise_to_minibatch=self.noise_to_minibatch,
                 stall_ratio=self.stall_ratio)
        return d


@dataclasses.dataclass
class NoiseReport:
    gemms: list
    options: dict
    draws: int
    loss: float
    step: Optional[int] = None
    torch_version: str = torch.__version__

    def summary(self) -> dict:
        """Sums over the measured GEMMs, per role and in total, with the same ratios."""
        out = {}
        for role in (*BACKWARD_ROLES, "total"):
            rows = [g for g in self.gemms if role == "total" or g.role == role]
            if not rows:
                continue
            signal = sum(g.signal for g in rows)
            noise = sum(g.compression_noise for g in rows)
            variance = sum(g.compression_variance for g in rows)
            bias = sum(g.compression_bias for g in rows)
            with_mb = [g for g in rows if g.minibatch_noise is not None]
            mb = sum(g.minibatch_noise for g in with_mb) if with_mb else None
            mb_noise = sum(g.compression_noise for g in with_mb)
            out[str(role)] = {  # plain str keys, as JSON reads back
                "gemms": len(rows),
                "signal": signal,
                "compression_noise": noise,
                "compression_variance": variance,
                "compression_bias": bias,
                "minibatch_noise": mb,
                "noise_to_signal": noise / signal if signal > 0 else None,
                "noise_to_minibatch": mb_noise / mb if mb else None,
            }
        return out

    def as_dict(self) -> dict:
        from nmcompile.version import __version__

        return {"schema": SCHEMA, "nmcompile": __version__, "torch": self.torch_version, "options": self.options,
                "draws": self.draws, "step": self.step, "loss": self.loss, "summary": self.summary(),
                "gemms": [g.as_dict() for g in self.gemms]}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def scalars(self, prefix: str = "nm_noise") -> dict:
        """``{tag: value}`` for TensorBoard: each GEMM's ratios and the totals per role."""
        tags = {}
        for g in self.gemms:
            name = f"{prefix}/{g.module or 'top'}.{g.role}"
            for key in ("noise_to_signal", "noise_to_minibatch", "stall_ratio"):
                value = getattr(g, key)
                if value is not None:
                    tags[f"{name}/{key}"] = value
        for role, s in self.summary().items():
            for key in ("noise_to_signal", "noise_to_minibatch"):
                if s[key] is not None:
                    tags[f"{prefix}/{role}/{key}"] = s[key]
        return tags

    def table(self, title: Optional[str] = None):
        from rich.table import Table

        table = Table(title=title or f"gradient noise per rewritten backward GEMM ({self.draws} draws)",
                      title_justify="left")
        for col in ("g", "module", "role", "transforms", "‖G‖²", "E‖Ĝ−G‖²", "of it bias²", "minibatch var",
                    "noise/‖G‖²", "noise/minibatch", "stall ratio"):
            table.add_column(col, justify="left" if col in ("module", "role", "transforms") else "right")
        for g in self.gemms:
            table.add_row(str(g.graph), g.module or "<top>", g.role, ", ".join(g.transforms), _num(g.signal),
                          _num(g.compression_noise), _num(g.compression_bias), _num(g.minibatch_noise),
                          _num(g.noise_to_signal), _num(g.noise_to_minibatch), _num(g.stall_ratio))
        for role, s in self.summary().items():
            if role == "total":
                table.add_section()
            table.add_row("", f"[bold]{role}[/bold]", "", f"{s['gemms']} GEMMs", _num(s["signal"]),
                          _num(s["compression_noise"]), _num(s["compression_bias"]), _num(s["minibatch_noise"]),
                          _num(s["noise_to_signal"]),
                          _num(s["noise_to_minibatch"]), "")
        return table


def _num(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return f"{x:.3g}"


# -- measuring one backward graph ------------------------------------------------------------------
def _compression(node: fx.Node) -> Optional[NodeInfo]:
    info = NodeInfo.read(node)
    if info is None or info.op[0] not in {spec.name for spec in ops_of(stage=Stage.GRADIENT)}:
        return None
    return info


def _floating(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _sampled(node: fx.Node) -> bool:
    spec = spec_of(node.target)
    return spec is not None and spec.sampled


class _Plan:
    """One backward GEMM's compression chain in a backward graph, and how to redraw it."""

    def __init__(self, gemm: fx.Node, chain: list, record):
        self.gemm, self.chain, self.record = gemm, chain, record
        members = set(chain)
        self.positions = [i for i, a in enumerate(gemm.args) if a in members]
        self.external = {a for c in chain for a in c.all_input_nodes if a not in members}
        # the gradient it compresses: the one floating-point input from outside (an expert GEMM's offsets are ints)
        floats = [a for a in self.external if _floating(a)]
        self.source = floats[0] if len(floats) == 1 else None
        self.problem = None
        if len(self.positions) != 1 or self.source is None or self.source in members:
            self.problem = "the compressed operand does not feed the GEMM directly"
        elif any(_sampled(c) and c.args[1] not in members for c in chain):
            self.problem = "the seeds are drawn outside the backward graph"


class _Measuring(fx.Interpreter):
    """Runs a backward graph and, at each planned GEMM, measures signal, compression and minibatch noise."""

    def __init__(self, gm: fx.GraphModule, plans: dict, monitor: "NoiseMonitor", graph: int):
        super().__init__(gm)
        self.plans, self.monitor, self.graph_index = plans, monitor, graph
        self.keep = set().union(*(p.external for p in plans.values())) if plans else set()
        self.saved: dict = {}

    def run_node(self, node: fx.Node):
        out = super().run_node(node)
        if node in self.keep:
            self.saved[node] = out
        plan = self.plans.get(node)
        if plan is not None:
            self.monitor._results.append(self._measure(plan, node, out))
        return out

    def _measure(self, plan: _Plan, node: fx.Node, out) -> GemmNoise:
        rec = plan.record
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        pick = _output_picker(node, rec.role)
        position = plan.positions[0]

        def gemm_with(operand):
            new = list(args)
            new[position] = operand
            return pick(node.target(*new, **kwargs)).double()

        exact_operand = self.saved[plan.source]
        exact = gemm_with(exact_operand)
        samples = [pick(out).double()] + [gemm_with(self._redraw(plan)) for _ in range(self.monitor.draws - 1)]
        k = len(samples)
        mean = sum(samples) / k
        variance = sum(_sq(s - mean) for s in samples) / (k - 1)
        noise = sum(_sq(s - exact) for s in samples) / k
        bias = _sq(mean - exact) - variance / k
        minibatch, note = None, None
        if is_update(rec.role):
            new = list(args)
            new[position] = exact_operand
            minibatch, note = _minibatch_noise(node, new, kwargs, exact, pick)
        else:
            note = f"a {rec.role} output is per sample: its minibatch noise shows in the update GEMMs upstream"
        return GemmNoise(self.graph_index, node.name, rec.module, rec.role, list(rec.transforms), _sq(exact), noise,
                         variance, bias, minibatch, note)

    def _redraw(self, plan: _Plan) -> torch.Tensor:
        values: dict = {}
        for c in plan.chain:
            if c.target is aten.randint.low:
                low, high, size = c.args[:3]
                device = torch.device(c.kwargs.get("device") or "cpu")
                values[c] = torch.randint(low, high, tuple(size), generator=self.monitor._generator(device),
                                          dtype=c.kwargs.get("dtype") or torch.int64, device=device)
            else:
                def lookup(n):
                    return values[n] if n in values else self.saved[n]

                values[c] = c.target(*map_arg(c.args, lookup), **map_arg(c.kwargs, lookup))
        return values[plan.gemm.args[plan.positions[0]]]


def _sq(x: torch.Tensor) -> float:
    return float(x.pow(2).sum())


def _output_picker(node: fx.Node, role: Role) -> Callable:
    if node.target is aten.convolution_backward.default:
        index = 0 if role == Role.DGRAD else 1
        return operator.itemgetter(index)
    return lambda value: value


def _minibatch_noise(node: fx.Node, args: list, kwargs: dict, exact: torch.Tensor, pick: Callable):
    """‖b·G_A − a·G_B‖²/(a·b) over the halves of the rows the update GEMM sums over."""
    if node.target is aten.mm.default:
        a_op, b_op = args
        rows = a_op.shape[1]
        if rows < 2:
            return None, f"{rows} row(s) summed over: no halves"
        a = rows // 2
        first = (a_op[:, :a].double() @ b_op[:a].double())
    elif node.target is aten.convolution_backward.default:
        rows = args[0].shape[0]
        if rows < 2:
            return None, f"batch of {rows}: no halves"
        a = rows // 2
        half = [args[0][:a], args[1][:a], *args[2:]]
        first = pick(node.target(*half, **kwargs)).double()
    else:
        return None, f"{node.target.__name__}: a batched GEMM's output is per sample (attention), no minibatch noise"
    b = rows - a
    second = exact - first
    return _sq(b * first - a * second) / (a * b), None


def _plans(gm: fx.GraphModule, records: dict) -> tuple[dict, list]:
    """GEMM node -> _Plan for every GEMM with a compressed gradient; and the GEMMs that cannot be measured."""
    chains: dict = {}
    for node in gm.graph.nodes:
        info = _compression(node)
        if info is not None:
            chains.setdefault(info.gemm, []).append(node)
    plans, unmeasured = {}, []
    for node in gm.graph.nodes:
        if node.name in chains and node.op == "call_function":
            rec = records.get(node.name)
            if rec is None:
                continue
            plan = _Plan(node, chains[node.name], rec)
            if plan.problem:
                unmeasured.append((rec, plan.problem))
            else:
                plans[node] = plan
    return plans, unmeasured


# -- the monitor ----------------------------------------------------------------------------------
class NoiseMonitor:
    """Measures the gradient noise of ``model`` compiled with the nm backend and ``options``.

    ``measure(*inputs)`` returns a :class:`NoiseReport` for one batch. In a training loop,
    ``monitor.on_step(step, *inputs)`` measures every ``every`` steps, appends one JSON line per
    measurement to ``path`` and writes the ratios as scalars to ``writer`` (anything with
    ``add_scalar(tag, value, step)``, e.g. ``torch.utils.tensorboard.SummaryWriter``). It changes neither
    the step's gradients nor torch's RNG stream. ``loss_fn(output)`` turns the model's output into the
    loss (default: ``output.loss`` or the sum of its floating-point tensors, as ``nmcompile.explain``).
    """

    def __init__(self, model: torch.nn.Module, options: Optional[dict] = None, *, every: int = 100,
                 loss_fn: Optional[Callable] = None, draws: int = 2, seed: int = 0, path=None, writer=None):
        from nmcompile.backend import GraphCounter
        from nmcompile.passes.config import NMConfig

        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be a positive integer number of steps")
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 2:
            raise ValueError(f"draws={draws!r} must be an integer >= 2 (the variance needs two independent draws)")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer must have add_scalar(tag, value, step), got {type(writer).__name__}")
        self.options = {**(options or {}), "inner": "aot_eager", "lowering": "emulate"}
        self.config, _ = NMConfig.from_options(self.options)  # validates: a bad option fails here
        self.model, self.every, self.draws, self.seed = model, every, draws, seed
        self.loss_fn, self.path, self.writer = loss_fn, path, writer
        self._records: list = []
        self._results: list = []
        self._unmeasured: list = []
        self._generators: dict = {}
        self._graphs = GraphCounter()  # numbers this monitor's Dynamo graphs, as recording() does
        self._compiled = torch.compile(model, backend=self._backend)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _backend(self, gm: fx.GraphModule, example_inputs):
        from nmcompile.backend import aot_eager
        from nmcompile.passes.joint_pass import NMJointPass

        index = self._graphs.next()
        first = len(self._records)

        def on_graph(graph: fx.GraphModule, kind: str):
            if kind != "backward":
                return None
            records = {r.node: r for r in self._records[first:] if r.graph == index}
            plans, unmeasured = _plans(graph, records)
            self._unmeasured.extend(unmeasured)
            return lambda *args: _Measuring(graph, plans, self, index).run(*args)

        joint_pass = NMJointPass.for_graph(self.config, example_inputs, decompose=False, records=self._records,
                                           graph=index)
        return aot_eager(gm, example_inputs, joint_pass, on_graph=on_graph)

    def measure(self, *inputs, step: Optional[int] = None) -> NoiseReport:
        from nmcompile.capture import reduce_output

        params = [p for p in self.model.parameters() if p.requires_grad]
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        devices = sorted({str(t.device) for t in (*params, *inputs) if isinstance(t, torch.Tensor)
                          and t.device.type == "cuda"})
        self._results = []
        with torch.random.fork_rng(devices=devices):
            out = self._compiled(*inputs)
            loss = self.loss_fn(out) if self.loss_fn is not None else reduce_output(out)
            torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)
        gemms, self._results = self._results, []
        if not gemms:
            why = "; ".join(f"{r.module or '<top>'} {r.role}: {p}" for r, p in self._unmeasured)
            raise ValueError("no backward GEMM with a compressed gradient to measure under options "
                             f"{self.options}" + (f" ({why})" if why else ""))
        return NoiseReport(gemms, dict(self.options), self.draws, float(loss.detach()), step)

    def on_step(self, step: int, *inputs) -> Optional[NoiseReport]:
        """Measure on this batch when ``step % every == 0``; returns the report then, else None."""
        if step % self.every:
            return None
        report = self.measure(*inputs, step=step)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(report.to_json(indent=None) + "\n")
        if self.writer is not None:
            for tag, value in report.scalars().items():
                if math.isfinite(value):
                    self.writer.add_scalar(tag, value, step)
        return report


def noise_report(model: torch.nn.Module, *inputs, loss_fn: Optional[Callable] = None, draws: int = 2,
                 seed: int = 0, **options) -> NoiseReport:
    """One measurement: ``noise_report(model, x, y, sparsity="2:4")`` (options as for ``backend="nm"``)."""
    return NoiseMonitor(model, options, loss_fn=loss_fn, draws=draws, seed=seed).measure(*inputs)
