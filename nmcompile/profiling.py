"""``nmcompile profile``: run training steps under torch.profiler and write a Chrome/Perfetto trace in
which every nm op carries its module, role and pattern.

How the attribution works (``inner="aot_eager"``, the default here): the partitioned forward and
backward graphs run eagerly, and before they run every ``torch.ops.nm.*`` node is wrapped in a
``torch.profiler.record_function`` range named ``nm::<op> <pattern> <role> <module> [g<graph>/<gemm>]``.
After ``export_chrome_trace`` the trace is post-processed: each such range (``user_annotation``) and
the ``nm::<op>`` operator event inside it get ``args`` ``module``, ``role``, ``pattern``, ``gemm``,
``graph`` (and ``n``/``m``/``bits`` where they apply). With ``inner="inductor"`` the nm ops run as
extern calls from Inductor's generated code: they show as ``nm::<op>`` operator events, but
without those args (the command says so).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import torch
import torch.fx as fx

from nmcompile.capture import Run, run_captured, run_step, step
from nmcompile.export import nm_attrs
from nmcompile.kernels.gemm import KERNELS
from nmcompile.passes.config import Inner, NMConfig

GEMM_OPS = tuple(dict.fromkeys(event for kernel in KERNELS.values() for event in kernel.events))
STEP_PREFIX = "ProfilerStep#"  # the name torch's scheduled profiler gives steps: HTA numbers iterations by it


def range_name(info: dict, graph: int) -> str:
    return f"nm::{info['op']} {info['pattern']} {info['role']} {info['module'] or '<top>'} [g{graph}/{info['gemm']}]"


class Annotator:
    """Wraps the nm nodes of the partitioned graphs in named ``record_function`` ranges and remembers
    what each range name stands for."""

    def __init__(self):
        self.ranges: dict[str, dict] = {}

    def __call__(self, gm: fx.GraphModule, kind: str, graph: int) -> None:
        changed = False
        for node in gm.graph.nodes:
            info = nm_attrs(node)
            if info is None:
                continue
            name = range_name(info, graph)
            self.ranges[name] = {**info, "graph": graph, "graph_kind": kind, "fx_node": node.name}
            node.target = _ranged(node.target, name)
            changed = True
        if changed:
            gm.recompile()


def _ranged(op, name: str):
    def nm_profiled(*args, **kwargs):
        with torch.profiler.record_function(name):
            return op(*args, **kwargs)

    nm_profiled.__name__ = f"nm_profiled_{op._opname}"
    nm_profiled.__qualname__ = nm_profiled.__name__
    return nm_profiled


ARG_KEYS = ("op", "module", "role", "pattern", "gemm", "graph", "n", "m", "dim", "bits", "levels", "density")


def annotate_trace(path: str, ranges: dict) -> int:
    """Add nm ``args`` to the ranges named in ``ranges`` and to the nm operator events inside them
    (same pid/tid, inside the range's time span); rewrites ``path``; returns how many events changed."""
    with open(path) as f:
        trace = json.load(f)
    events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    spans = []
    changed = 0
    for ev in events:
        info = ranges.get(ev.get("name"))
        if info is not None and ev.get("ph") == "X":
            ev.setdefault("args", {}).update({k: info[k] for k in ARG_KEYS if k in info})
            spans.append(
                (ev.get("pid"), ev.get("tid"), float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0)), info)
            )
            changed += 1
    for ev in events:
        name = ev.get("name", "")
        if ev.get("ph") != "X" or not name.startswith("nm::") or name in ranges:
            continue
        ts = float(ev.get("ts", 0))
        for pid, tid, start, end, info in spans:
            if pid == ev.get("pid") and tid == ev.get("tid") and start <= ts <= end and name == f"nm::{info['op']}":
                ev.setdefault("args", {}).update({k: info[k] for k in ARG_KEYS if k in info})
                changed += 1
                break
    with open(path, "w") as f:
        json.dump(trace, f)
    return changed


@dataclasses.dataclass
class TimeSummary:
    steps: int
    total_us: float
    nm_us: float
    gemm_us: float
    per_op: dict  # nm range / op name -> total µs

    @property
    def other_us(self) -> float:
        return max(self.total_us - self.nm_us - self.gemm_us, 0.0)

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "total_us": self.total_us,
            "nm_us": self.nm_us,
            "gemm_us": self.gemm_us,
            "other_us": self.other_us,
        }


def summarize(path: str) -> TimeSummary:
    """CPU-side time split of the profiled steps: nm ops (their ranges), GEMMs (GEMM operator events
    not inside an nm range), and the rest, from the exported trace."""
    with open(path) as f:
        trace = json.load(f)
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in events if str(e.get("name", "")).startswith(STEP_PREFIX)]
    total = sum(float(e["dur"]) for e in steps)
    nm_spans = [e for e in events if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("nm::")]
    nm_total = sum(float(e["dur"]) for e in nm_spans)
    per_op: dict = {}
    for e in nm_spans:
        key = e["name"].split(" [")[0]
        per_op[key] = per_op.get(key, 0.0) + float(e["dur"])

    def inside_nm(e) -> bool:
        ts = float(e["ts"])
        return any(
            s["pid"] == e["pid"] and s["tid"] == e["tid"] and float(s["ts"]) <= ts <= float(s["ts"]) + float(s["dur"])
            for s in nm_spans
        )

    gemm_events = [e for e in events if e.get("cat") == "cpu_op" and e.get("name") in GEMM_OPS]
    # count only outermost GEMM events (convolution wraps mkldnn_convolution, etc.)
    gemm_events.sort(key=lambda e: (e["pid"], e["tid"], float(e["ts"]), -float(e["dur"])))
    gemm_total, last_end = 0.0, {}
    for e in gemm_events:
        key = (e["pid"], e["tid"])
        if float(e["ts"]) < last_end.get(key, -1.0) or inside_nm(e):
            continue
        gemm_total += float(e["dur"])
        last_end[key] = float(e["ts"]) + float(e["dur"])
    return TimeSummary(len(steps), total, nm_total, gemm_total, per_op)


def profile_run(model: torch.nn.Module, inputs: tuple, options: dict, config: NMConfig, steps: int,
                out_path: str) -> tuple:
    """Compile, warm up (one step, outside the profiler), profile ``steps`` steps, write the trace.
    ``config`` is ``options`` parsed (``NMConfig.from_options(options)[0]``). A model that fails to run
    raises ``nmcompile.capture.ModelRunError``.

    Returns (run, annotator or None, changed event count, TimeSummary)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from nmcompile.backend import nm_backend, recording

    annotator: Optional[Annotator] = None
    if config.inner == Inner.AOT_EAGER:
        annotator = Annotator()
        run = run_captured(model, inputs, options, wrap=annotator, config=config)
        compiled = run.compiled
    else:
        torch._dynamo.reset()
        with recording() as records:
            compiled = torch.compile(model, backend=nm_backend, options=dict(options))
            run_step(compiled, model, inputs)
        run = Run(model, inputs, options, config, [], list(records), compiled)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for i in range(steps):
            with record_function(f"{STEP_PREFIX}{i}"):
                step(compiled, model, inputs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    prof.export_chrome_trace(out_path)
    changed = annotate_trace(out_path, annotator.ranges) if annotator is not None else 0
    return run, annotator, changed, summarize(out_path)
