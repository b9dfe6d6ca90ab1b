"""CPU benchmark of backend "nm" against backend "inductor": compile time and step time.

    python tools/bench_cpu.py [--mode compile|step|all] [--models mlp,tlayer,llama,bert]
                              [--options '2:4,luq+sawb'] [--steps 30] [--out bench-cpu.json]

Every number is reported next to Inductor's, measured in the same process, and the claim is their
ratio nm / inductor: the 2-core machines this runs on are slow and noisy, so absolute times say little.

Models (``--models``, built in code with a fixed seed, nothing downloaded): an MLP, a PyTorch
``nn.TransformerEncoderLayer``, and small Hugging Face ``LlamaForCausalLM`` and ``BertForMaskedLM``
(eager attention, so the attention matmuls are plain GEMMs the nm pass can see; these two need
``transformers`` and are skipped without it). Option sets: see ``--options``.

``--mode compile``: the wall time of the *first* forward+backward step of a freshly built model under
``torch.compile``, i.e. Dynamo tracing, AOTAutograd, the nm pass, Inductor's code generation and C++
compilation, and one execution.
  - Cold caches: ``torch._inductor.config.force_disable_caches`` is set for the whole run (each compile
    gets an empty cache directory and cleared in-memory caches), and every compile starts from
    ``torch._dynamo.reset()``.
  - Before the first model, a throwaway compile of a tiny unrelated function with each backend takes
    the process's one-time start-up (imports, compiler and ISA detection, and the build of the nm
    ops' CPU kernels, rebuilt once per process under cold caches) off whichever row comes first; its
    times are kept in the JSON meta data (``startup_s``) and printed.
  - Backend inductor is compiled before the option sets, between their halves and after them, so that
    drift over the run hits both backends; each row's ratio is nm over the median of those.

``--mode step``: for each model and option set, both backends are compiled on the same model, warmed
up, then ``--steps`` forward+backward steps are timed alternating between the two (so drift hits both
alike); reported are the medians and their ratio. The compiling step also yields Inductor's generated
code, in which the backward graphs' fused C++ kernels (``cpp_fused_*``), extern (GEMM/conv) calls and
fallback op calls (ops Inductor did not lower, e.g. ``torch.ops.nm.*``) are counted with and without
the nm pass: each nm op is one call of a precompiled kernel, never math inlined into Inductor's
kernels (README, "Design decisions, and why": lowering on CPU).

Progress goes to stderr as each measurement finishes; stdout gets one Markdown table per mode, ready
to paste into BENCHMARKS.md; ``--out`` writes all rows and the run's meta data as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from unittest import mock

import torch
import torch.nn as nn
from torch._inductor.graph import GraphLowering

import nmcompile  # noqa: F401  (ops registered; backend found through the entry point anyway)
from nmcompile.demo.environment import cpu_name
from nmcompile.recipes import recipe

# name here -> recipe (nmcompile.recipes); the names are those of BENCHMARKS.md's rows
OPTIONS: dict[str, dict] = {name: recipe(r).options for name, r in {
    "2:4": "mvue 2:4", "1:2": "mvue 1:2", "luq": "luq4", "luq+sawb": "luq4 + sawb4", "2:4+luq": "mvue 2:4 + luq4",
    "2:4 wgrad+dgrad": "mvue 2:4 wgrad+dgrad", "luq+absmax8": "luq4 + absmax8"}.items()}
# the native graph as CPU runs it (int8 GEMMs, the 2:4 product checked and computed dense): its compile cost matters
# (the default "auto" runs the int8 GEMMs only)
OPTIONS["2:4+luq+sawb native"] = {**recipe("mvue 2:4 wgrad+dgrad + luq4 + sawb4").options, "lowering": "native"}
WARMUP_STEPS = 3
SEED = 0


# ----------------------------------------------------------------------------- models
@dataclass
class Workload:
    """A model, its inputs and its loss: ``step`` runs one forward+backward through ``f``."""

    model: nn.Module
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    loss: Callable[[Any], torch.Tensor] = lambda out: out.float().pow(2).mean()

    def step(self, f: Callable) -> None:
        self.loss(f(*self.args, **self.kwargs)).backward()


def build_mlp() -> Workload:
    mlp = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512))
    return Workload(mlp, (torch.randn(4096, 512),))


def build_tlayer() -> Workload:
    layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    return Workload(layer, (torch.randn(8, 256, 256),))


HF_BATCH, HF_SEQ = 8, 128
HF_SIZES = dict(vocab_size=1000, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=HF_SEQ, attn_implementation="eager")


def _language_model(model: nn.Module) -> Workload:
    """Random token ids as inputs and labels; the loss is the model's own (``.loss``)."""
    ids = torch.randint(0, model.config.vocab_size, (HF_BATCH, HF_SEQ))
    return Workload(model, kwargs={"input_ids": ids, "labels": ids}, loss=lambda out: out.loss)


def build_llama() -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    return _language_model(LlamaForCausalLM(LlamaConfig(**HF_SIZES)))


def build_bert() -> Workload:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **HF_SIZES)
    return _language_model(BertForMaskedLM(config))


@dataclass(frozen=True)
class ModelSpec:
    key: str
    name: str
    build_fn: Callable[[], Workload]
    needs: Optional[str] = None  # a package without which the model is skipped

    def build(self) -> Workload:
        """A fresh model in training mode, the same every time (seeded)."""
        torch.manual_seed(SEED)
        work = self.build_fn()
        work.model.train()
        return work


_hf = f"{HF_SIZES['num_hidden_layers']} layers, d={HF_SIZES['hidden_size']}, {HF_BATCH}x{HF_SEQ} tokens"
MODELS = {spec.key: spec for spec in [
    ModelSpec("mlp", "MLP 512-2048-512, 4096 tokens", build_mlp),
    ModelSpec("tlayer", "TransformerEncoderLayer d=256, 8x256 tokens", build_tlayer),
    ModelSpec("llama", f"LlamaForCausalLM {_hf}", build_llama, needs="transformers"),
    ModelSpec("bert", f"BertForMaskedLM {_hf}", build_bert, needs="transformers"),
]}


# ----------------------------------------------------------------------------- measuring
def compiled(model: nn.Module, label: Optional[str]) -> Callable:
    """``model`` under backend inductor (``label`` None) or backend nm with the option set ``label``."""
    if label is None:
        return torch.compile(model, backend="inductor")
    return torch.compile(model, backend="nm", options=OPTIONS[label])


def timed(work: Workload, f: Callable) -> float:
    """Seconds for one forward+backward step (gradients reset first, outside the timing)."""
    work.model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    work.step(f)
    return time.perf_counter() - t


def timed_with_code(work: Workload, f: Callable) -> tuple[float, list[str]]:
    """``timed``, also returning the wrapper code Inductor generates meanwhile (caches must be off)."""
    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        seconds = timed(work, f)
    return seconds, codes


KERNEL_PATTERNS = {
    "fused_kernels": re.compile(r"^cpp_fused_\w+ = ", re.M),  # C++ kernels Inductor generated
    "extern_calls": re.compile(r"extern_kernels\.\w+\("),  # GEMMs, convolutions
    # ops Inductor did not lower but calls as they are (e.g. torch.ops.nm.*, aten.randint.low_out)
    "fallback_calls": re.compile(r"^\s+(?:\w+ = )?(?:aten|torch\.ops\.(?!inductor\.)\w+)\.\w+\.\w+\(", re.M),
}


def backward_kernels(codes: list[str]) -> dict:
    """Kernels and calls in the backward graphs (those taking tangents) of Inductor's wrapper code."""
    backward = "\n".join(code for code in codes if "tangents_" in code)
    return {name: len(pattern.findall(backward)) for name, pattern in KERNEL_PATTERNS.items()}


def warm_up_process() -> dict:
    """Compile and run a tiny unrelated function once per backend; returns the seconds each took."""
    def tiny(x, w):
        return (x @ w).relu().sum()

    startup = {}
    for label in [None, next(iter(OPTIONS))]:
        torch._dynamo.reset()
        x, w = torch.randn(8, 16), torch.randn(16, 8, requires_grad=True)
        t = time.perf_counter()
        compiled(tiny, label)(x, w).backward()
        startup[backend_name(label)] = time.perf_counter() - t
    from nmcompile.kernels import cpu

    cpu.library()  # built in the background meanwhile: wait for it, and say how long it took
    startup["nm CPU kernels build (part of nm's)"] = cpu.build_seconds or 0.0
    torch._dynamo.reset()
    return startup


def backend_name(label: Optional[str]) -> str:
    return "inductor" if label is None else f"nm {label}"


def log(message: str, end: str = "\n") -> None:
    print(message, end=end, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- modes
def result(mode: str, spec: ModelSpec, label: str, **values) -> dict:
    """One row of the report (and of the JSON output)."""
    return {"mode": mode, "model": spec.name, "options": label, "nm_options": OPTIONS[label], **values}


def compile_schedule(labels: list[str]) -> list[Optional[str]]:
    """Inductor (None) first, last, and between the halves of the option sets when there are 3+."""
    half = len(labels) // 2
    middle = [None] if len(labels) >= 3 else []
    return [None, *labels[:half], *middle, *labels[half:], None]


def compile_seconds(spec: ModelSpec, label: Optional[str]) -> float:
    """Cold first forward+backward step of a freshly built model under the given backend."""
    torch._dynamo.reset()
    work = spec.build()
    return timed(work, compiled(work.model, label))


def bench_compile(spec: ModelSpec, labels: list[str]) -> list[dict]:
    runs: dict[Optional[str], list[float]] = {}
    for label in compile_schedule(labels):
        log(f"[compile] {spec.key:6s} {backend_name(label):20s} ...", end="")
        seconds = compile_seconds(spec, label)
        runs.setdefault(label, []).append(seconds)
        log(f" {seconds:7.2f} s")
    inductor_s = statistics.median(runs[None])
    return [result("compile", spec, label, inductor_s=inductor_s, nm_s=runs[label][0],
                   ratio=runs[label][0] / inductor_s, inductor_runs_s=runs[None]) for label in labels]


def bench_step(spec: ModelSpec, labels: list[str], steps: int) -> list[dict]:
    rows = []
    for label in labels:
        log(f"[step]    {spec.key:6s} {backend_name(label):20s} ...", end="")
        started = time.perf_counter()
        torch._dynamo.reset()
        work = spec.build()
        base, nm = compiled(work.model, None), compiled(work.model, label)
        kernels = {name: backward_kernels(timed_with_code(work, f)[1]) for name, f in [("inductor", base), ("nm", nm)]}
        for _ in range(WARMUP_STEPS):
            timed(work, base)
            timed(work, nm)
        times = {"inductor": [], "nm": []}
        for _ in range(steps):
            times["inductor"].append(timed(work, base))
            times["nm"].append(timed(work, nm))
        inductor_ms, nm_ms = (1e3 * statistics.median(times[name]) for name in ("inductor", "nm"))
        row = result("step", spec, label, inductor_ms=inductor_ms, nm_ms=nm_ms, ratio=nm_ms / inductor_ms,
                     kernels_inductor=kernels["inductor"], kernels_nm=kernels["nm"])
        rows.append(row)
        log(f" inductor {row['inductor_ms']:8.2f} ms  nm {row['nm_ms']:8.2f} ms  ratio {row['ratio']:.3f}  "
            f"bwd kernels {kernel_cell(row)}  ({time.perf_counter() - started:.0f} s)")
    return rows


# ----------------------------------------------------------------------------- reporting
def kernel_cell(row: dict) -> str:
    def counts(kernels):
        return "/".join(str(kernels[name]) for name in KERNEL_PATTERNS)
    return f"{counts(row['kernels_inductor'])} → {counts(row['kernels_nm'])}"


TABLES = {
    "compile": (
        ["inductor (s)", "nm (s)", "ratio nm / inductor"],
        lambda r: [f"{r['inductor_s']:.1f}", f"{r['nm_s']:.1f}", f"**{r['ratio']:.2f}**"],
    ),
    "step": (
        ["inductor (ms)", "nm (ms)", "ratio nm / inductor", "bwd kernels inductor → nm (fused / extern / fallback)"],
        lambda r: [f"{r['inductor_ms']:.1f}", f"{r['nm_ms']:.1f}", f"**{r['ratio']:.2f}**", kernel_cell(r)],
    ),
}


def markdown_table(mode: str, rows: list[dict]) -> str:
    header, cells = TABLES[mode]
    lines = ["| model | options | " + " | ".join(header) + " |", "|---|---|" + "---:|" * 3 + "---|" * (len(header) - 3)]
    for r in rows:
        if r["mode"] == mode:
            lines.append(f"| {r['model']} | `{json.dumps(r['nm_options'])}` | " + " | ".join(cells(r)) + " |")
    return "\n".join(lines)


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def meta_data(args, models: list[ModelSpec], skipped: list[str]) -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "transformers": package_version("transformers"),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": args.mode,
        "steps": args.steps,
        "models": [m.key for m in models],
        "skipped": skipped,
        "options": {label: OPTIONS[label] for label in args.options},
    }


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    ap.add_argument(
        "--mode",
        choices=["compile", "step", "all"],
        default="all",
        help="compile: cold compile time of the first step; step: step time; all: both (default)",
    )
    ap.add_argument(
        "--models",
        type=_choices(MODELS),
        default=list(MODELS),
        help=f"comma-separated subset of {','.join(MODELS)} (default: all)",
    )
    ap.add_argument(
        "--options",
        type=_choices(OPTIONS),
        default=list(OPTIONS),
        help="comma-separated subset of the option sets " + ", ".join(f"'{k}'" for k in OPTIONS) + " (default: all)",
    )
    ap.add_argument("--steps", type=int, default=30, help="timed steps per backend in --mode step (default 30)")
    ap.add_argument("--out", default=None, metavar="FILE.json", help="write all rows and meta data here")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    return args


def _choices(allowed: dict) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        keys = [k.strip() for k in text.split(",") if k.strip()]
        unknown = [k for k in keys if k not in allowed]
        if unknown or not keys:
            raise argparse.ArgumentTypeError(f"{unknown or text!r}: choose from {', '.join(allowed)}")
        return keys

    return parse


def available_models(keys: list[str]) -> tuple[list[ModelSpec], list[str]]:
    models, skipped = [], []
    for key in keys:
        spec = MODELS[key]
        if spec.needs and importlib.util.find_spec(spec.needs) is None:
            log(f"skipping {key}: it needs the '{spec.needs}' package (pip install {spec.needs}, or the [test] extra)")
            skipped.append(key)
        else:
            models.append(spec)
    return models, skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    modes = ["compile", "step"] if args.mode == "all" else [args.mode]
    models, skipped = available_models(args.models)
    torch._inductor.config.force_disable_caches = True  # cold compiles; and generated code is always seen
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # says so once per compile
    startup = warm_up_process() if "compile" in modes else {}
    if startup:
        log(
            "process start-up (throwaway compile of a tiny function): "
            + ", ".join(f"{name} {s:.1f} s" for name, s in startup.items())
        )
    rows = []
    for mode in modes:
        for spec in models:
            rows += (
                bench_compile(spec, args.options) if mode == "compile" else bench_step(spec, args.options, args.steps)
            )
    meta = meta_data(args, models, skipped) | {"startup_s": startup}
    for mode in modes:
        print(
            f"\n{mode} — torch {meta['torch']}, Python {meta['python']}, transformers {meta['transformers']}, "
            f"{meta['cpu']}, {meta['threads']} threads, {meta['date']}\n"
        )
        print(markdown_table(mode, rows))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
