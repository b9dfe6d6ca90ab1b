"""Training steps on CPU: backend nm on exact int8 GEMMs against Inductor in fp32 and under bf16 autocast.

    python tools/bench_step_cpu.py [--layers 4 --d 1024 --batch 8 --seq 512 --steps 12] [--out step-cpu.json]
    python tools/bench_step_cpu.py --small     # 2 blocks, d = 128: where int8 GEMMs stop paying on some CPUs
    python tools/bench_step_cpu.py --profile   # also one profiled step per configuration: its top ops
    python tools/bench_step_cpu.py --smoke     # a tiny model, two steps: checks the script, measures nothing
    python tools/bench_step_cpu.py --model gpt2  # Hugging Face's GPT-2 (transformers) of the same size instead

The model is a stack of pre-LayerNorm Transformer blocks (causal ``scaled_dot_product_attention``, GELU
MLP 4d; ``nmcompile.examples.Block``) between a small input projection and a small output head (the model's
first layer is the byte embedding, its last the head, which ``keep_first_last`` keeps in high precision),
trained with AdamW on next-byte prediction over Python's standard-library sources (the training bytes of
``tools/lm/corpus.py``, embedded in 256 dims): batch × seq tokens a step, the same batches for every configuration.

Configurations (``--configs``): Inductor in fp32 and under ``torch.autocast("cpu", torch.bfloat16)``
(the baseline a CPU user has); backend nm with LUQ4 gradients and SAWB4 forward, and with LUQ4
gradients and the absmax INT8 forward, each in fp32 and under bf16 autocast, default ``lowering``
(auto: exact int8 GEMMs on CPUs with AVX512-VNNI or AMX); the ``int8`` preset (SR8 gradients with per-row
scales, absmax8 forward, each layer dense where that is faster on this CPU: ``dense_if_faster``) in fp32 and
under bf16 autocast, there also with every layer on int8; the preset with one SR8 scale per tensor or
per-tensor absmax8 scales (the presets before), with power-of-two scales (``pow2_scales``), and with
torchao's 8-bit AdamW (``torchao.optim.AdamW8bit``); Inductor with ``torch.utils.checkpoint`` per block (what
a user short of memory would do); and torchao's int8 mixed-precision training
(``torchao.prototype.quantized_training.int8_mixed_precision_training``, compiled with Inductor). The
configurations that need torchao are skipped, with a line on stderr, where it is not installed.

Every model starts from the same weights. Each is compiled by its first step (compile time: that
step's wall time, caches as the process finds them), warmed up, then the timed steps alternate
between the configurations (step i of every configuration before step i + 1 of any), so drift hits
all alike; reported are median step times and their ratios to fp32 Inductor and to bf16 Inductor.

Memory: one more step per configuration under ``nmcompile.memory.peak_bytes``: the peak of the tensor
bytes alive at once during the step (activations, gradients, temporaries), plus the bytes alive when
the step starts (parameters and optimizer state). Gradients are set to None between steps, so they are
part of the step's allocations; "activations" is the peak less parameters, gradients and optimizer state.
The loss is each configuration's mean over its last 3 timed steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import nmcompile
from nmcompile.demo.environment import cpu_name
from nmcompile.examples import Block
from nmcompile.kernels import cpu
from nmcompile.memory import peak_bytes, tensor_bytes
from nmcompile.passes.roles import Role
from nmcompile.recipes import recipe

from lm.corpus import fixed_batches, stdlib_corpus  # tools/lm: the LM tools' shared parts

LUQ_SAWB = recipe("luq4 + sawb4").options
LUQ_INT8 = recipe("luq4 + absmax8").options
INT8 = recipe("int8").options  # SR8 gradients, absmax8 forward (per-row scales both), dense where that is faster here
@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration: backend options (None: Inductor alone; "torchao": torchao's int8 training under
    Inductor), bf16 autocast, ``torch.utils.checkpoint`` per block (what a user would otherwise do for
    memory), and the optimizer (``"adamw8bit"``: ``torchao.optim.AdamW8bit``, for the optimizer state's share)."""

    options: Union[dict, str, None]
    autocast: bool = False
    checkpoint: bool = False
    optimizer: str = "adamw"


CONFIGS = {
    "inductor fp32": Config(None),
    "inductor bf16": Config(None, True),
    "inductor fp32 checkpoint": Config(None, checkpoint=True),
    "inductor bf16 checkpoint": Config(None, True, checkpoint=True),
    "nm luq4+sawb4": Config(LUQ_SAWB),
    "nm luq4+int8fwd": Config(LUQ_INT8),
    "nm int8": Config(INT8),
    "nm int8 bf16": Config(INT8, True),
    "nm int8 bf16 all-int8": Config({**INT8, "dense_if_faster": False}, True),
    "nm int8 tensor-sr8": Config({**INT8, "scales": "tensor"}),
    "nm int8 tensor-absmax8": Config({**INT8, "fwd_scales": "tensor"}),  # the preset before its forward went per row
    "nm int8 pow2": Config({**INT8, "pow2_scales": True}),  # power-of-two scales: the rescale in fp32
    "nm int8 bf16 pow2": Config({**INT8, "pow2_scales": True}, True),
    "nm int8 no recompute": Config({**INT8, "recompute": False}),  # the preset before it recomputed from codes
    "nm int8 adamw8bit": Config(INT8, optimizer="adamw8bit"),
    # and an 8-bit copy of each other activation the backward keeps (changes the numbers: an option, off in the preset)
    "nm int8 saved8": Config({**INT8, "saved_int8": True}),
    "nm int8 saved8 adamw8bit": Config({**INT8, "saved_int8": True}, optimizer="adamw8bit"),
    "nm int8 bf16 adamw8bit": Config(INT8, True, optimizer="adamw8bit"),
    "nm luq4+sawb4 bf16": Config(LUQ_SAWB, True),
    "nm luq4+int8fwd bf16": Config(LUQ_INT8, True),
    "torchao int8 mp": Config("torchao"),
}
NEEDS_TORCHAO = [name for name, c in CONFIGS.items() if c.options == "torchao" or c.optimizer == "adamw8bit"]


class Net(nn.Module):
    """Bytes -> 256-dim embedding -> Linear to d -> Transformer blocks -> LayerNorm -> Linear to 256 logits."""

    def __init__(self, layers: int, d: int, heads: int, checkpoint: bool = False):
        super().__init__()
        self.checkpoint = checkpoint
        self.embed = nn.Embedding(256, 256)
        self.inp = nn.Linear(256, d)
        self.blocks = nn.ModuleList(Block(d, heads, sdpa=True) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)

    def forward(self, idx, targets):
        x = self.inp(self.embed(idx))
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpoint else block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class GPT2(nn.Module):
    """Hugging Face's GPT-2 (``transformers.GPT2LMHeadModel``, built from a config: no weights to download) on the
    same bytes: vocabulary 256, ``layers`` blocks of width d, SDPA attention, no dropout. With ``checkpoint``,
    its own gradient checkpointing (``torch.utils.checkpoint`` per block, non-reentrant), as its users turn it on."""

    def __init__(self, layers: int, d: int, heads: int, checkpoint: bool = False, seq: int = 512):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=256, n_positions=seq, n_embd=d, n_layer=layers, n_head=heads, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
        self.model = GPT2LMHeadModel(config)
        if checkpoint:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, idx, targets):
        logits = self.model(input_ids=idx, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


MODELS = {"net": Net, "gpt2": GPT2}


def build(args, checkpoint: bool = False) -> nn.Module:
    if args.model == "gpt2":
        return GPT2(args.layers, args.d, args.heads, checkpoint, args.seq)
    return Net(args.layers, args.d, args.heads, checkpoint)


def torchao_version() -> Optional[str]:
    try:
        import torchao

        return torchao.__version__
    except ImportError:
        return None


class Run:
    """One configuration: its model (compiled), optimizer, and what it measured."""

    def __init__(self, name: str, config: Config, args, state: dict):
        options = config.options
        self.name, self.options, self.autocast = name, options, config.autocast
        model = build(args, config.checkpoint)
        model.load_state_dict(state)
        if options == "torchao":
            from torchao import quantize_
            from torchao.prototype.quantized_training import int8_mixed_precision_training

            # its int8 GEMMs on every Linear of the blocks; the two end layers stay fp32, as nm keeps them
            quantize_(model.blocks, int8_mixed_precision_training())
        self.model = model
        backend = "nm" if isinstance(options, dict) else "inductor"
        self.step_fn = torch.compile(model, backend=backend, options=options if backend == "nm" else None)
        if config.optimizer == "adamw8bit":
            from torchao.optim import AdamW8bit

            self.opt = AdamW8bit(model.parameters(), lr=args.lr, weight_decay=0.0)
        else:
            self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        self.times: list = []
        self.losses: list = []
        self.compile_s = None
        self.kernels: dict = {}
        self.dense_layers: list = []  # why each layer dense_if_faster left dense

    def step(self, tokens) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.step_fn(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        return time.perf_counter() - t0

    def state_bytes(self) -> int:
        tensors = list(self.model.parameters())
        for state in self.opt.state.values():
            tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
        return tensor_bytes(tensors)

    def peak_step_bytes(self, tokens) -> tuple[int, int]:
        """(the step's peak bytes, its activation bytes: the peak less parameters, gradients and optimizer
        state), see the docstring."""
        before = self.state_bytes()
        grads = {}  # the step's zero_grad(set_to_none) frees the gradients: sized before the optimizer runs
        hook = self.opt.register_step_pre_hook(
            lambda opt, args, kwargs: grads.update(bytes=tensor_bytes(p.grad for p in self.model.parameters()
                                                                        if p.grad is not None)))
        try:
            _, peak = peak_bytes(lambda: self.step(tokens), before)
        finally:
            hook.remove()
        self.losses.pop()  # an extra step: the reported losses stay those of the timed steps
        return peak, peak - before - grads.get("bytes", 0)  # the state is as it was: no first step here

    def profile(self, tokens, top: int = 12) -> list:
        """One step under torch.profiler: the ``top`` ops by self CPU time, as [name, seconds, calls]."""
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            self.step(tokens)
        self.losses.pop()  # an extra step: the reported losses stay those of the same steps as without --profile
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        return [[e.key, e.self_cpu_time_total / 1e6, e.count] for e in rows]


# what decides a CPU's fast GEMMs: written next to every number
FLAGS = ("amx_int8", "amx_bf16", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512f")


def cpu_features() -> list:
    return [f for f in FLAGS if f in cpu.cpu_flags().split()]


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default="net",
                   help="net: the Transformer stack below; gpt2: Hugging Face's GPT-2 of the same size (transformers)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=12, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    p.add_argument("--no-memory", action="store_true", help="skip the profiled memory step")
    p.add_argument("--small", action="store_true",
                   help="the small model: 2 blocks, d=128, 4 heads (where int8 GEMMs stop paying on some CPUs)")
    p.add_argument("--profile", action="store_true", help="one more step per configuration under torch.profiler: "
                   "its top ops by self time")
    p.add_argument("--smoke", action="store_true", help="a tiny model for two steps: checks the script")
    p.add_argument("--out", help="write all results as JSON here")
    args = p.parse_args(argv)
    if args.small:
        args.layers, args.d, args.heads = 2, 128, 4
    if args.smoke:
        args.layers, args.d, args.heads, args.batch, args.seq, args.steps, args.warmup = 1, 64, 2, 2, 32, 2, 0
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    skipped = [n for n in names if n in NEEDS_TORCHAO] if torchao_version() is None else []
    if skipped:
        print(f"torchao is not installed (pip install torchao): skipping {', '.join(skipped)}", file=sys.stderr)
        names = [n for n in names if n not in skipped]

    torch.manual_seed(0)
    state = build(args).state_dict()
    data = fixed_batches(stdlib_corpus()[0], args.warmup + args.steps + 2, args.batch, args.seq)
    runs = []
    for name in names:
        print(f"compiling {name} ...", file=sys.stderr, flush=True)
        run = Run(name, CONFIGS[name], args, state)
        with nmcompile.backend.recording() as records:
            run.compile_s = run.step(data[0])
        for r in records:
            if r.transforms:
                run.kernels[str(r.kernel)] = run.kernels.get(str(r.kernel), 0) + 1
            elif r.role == Role.FWD and r.skipped and "dense is faster" in r.skipped:
                run.dense_layers.append(r.skipped)
        dense = f", {len(run.dense_layers)} layers dense (faster here)" if run.dense_layers else ""
        print(f"  {name}: compiled in {run.compile_s:.1f} s, kernels {run.kernels}{dense}", file=sys.stderr, flush=True)
        for i in range(args.warmup):
            run.step(data[1 + i])
        runs.append(run)
    for i in range(args.steps):
        for run in runs:
            run.times.append(run.step(data[1 + args.warmup + i]))
        print(f"step {i + 1}/{args.steps}: " + ", ".join(f"{r.name} {r.times[-1]:.2f} s" for r in runs),
              file=sys.stderr, flush=True)
    memory = {}
    if not args.no_memory:
        for run in runs:
            memory[run.name] = run.peak_step_bytes(data[-1])
    profiles = {run.name: run.profile(data[-2]) for run in runs} if args.profile else {}

    median = {r.name: statistics.median(r.times) for r in runs}
    base32, base16 = median.get("inductor fp32"), median.get("inductor bf16")
    rows = []
    for run in runs:
        m = median[run.name]
        rows.append({
            "config": run.name, "options": run.options, "autocast_bf16": run.autocast, "compile_s": run.compile_s,
            "step_s": m, "step_times": run.times, "vs_fp32": m / base32 if base32 else None,
            "vs_bf16": m / base16 if base16 else None, "peak_bytes": memory.get(run.name, (None, None))[0],
            "activation_bytes": memory.get(run.name, (None, None))[1],
            "loss_last3": statistics.mean(run.losses[-3:]), "losses": run.losses, "kernels": run.kernels,
            "profile": profiles.get(run.name), "dense_layers": run.dense_layers,
        })
    mem32, act32 = memory.get("inductor fp32", (None, None))
    model = "GPT-2 (transformers), " if args.model == "gpt2" else ""
    print(f"\n{model}{args.layers} blocks, d={args.d}, {args.batch}x{args.seq} tokens, AdamW; {cpu_name()} "
          f"({', '.join(cpu_features()) or 'none of ' + ', '.join(FLAGS)}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    print("| configuration | step (s) | × fp32 Inductor | × bf16 Inductor | peak memory (MiB) | × fp32 | "
          "activations (MiB) | × fp32 | loss (last 3) | compile (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        peak, act = row["peak_bytes"], row["activation_bytes"]
        memory_cells = (f"{peak / 2**20:.0f} | {_x(peak / mem32 if mem32 else None)} | {act / 2**20:.0f} | "
                        f"{_x(act / act32 if act32 else None)}" if peak else "– | – | – | –")
        print(f"| {row['config']} | {row['step_s']:.3f} | {_x(row['vs_fp32'])} | {_x(row['vs_bf16'])} | "
              f"{memory_cells} | {row['loss_last3']:.4f} | {row['compile_s']:.1f} |")
    for name, top in profiles.items():
        ops = "; ".join(f"{op} {t:.3f} s ({n})" for op, t, n in top)
        print(f"\n{name}, one step, top ops by self CPU time: {ops}")
    if args.out:
        meta = {"cpu": cpu_name(), "cpu_features": cpu_features(), "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "nmcompile": nmcompile.__version__, "torchao": torchao_version(), "args": vars(args)}
        pathlib.Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


def _x(ratio: Optional[float]) -> str:
    return f"{ratio:.2f}×" if ratio else "–"


if __name__ == "__main__":
    sys.exit(main())
