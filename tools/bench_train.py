"""Training steps of a GPT-style decoder: backend nm (``lowering="native"``) against backend inductor, on a GPU.

    python tools/bench_train.py [--layers 12 --d 1024 --seq 1024 --batch 8 --steps 200] [--out bench-train.json]
    python tools/bench_train.py --smoke        # a tiny decoder on CPU for a few steps (tests the script)

The decoder is ``nmcompile.examples.GPT`` (pre-LayerNorm blocks, causal ``scaled_dot_product_attention``, GELU
MLP, tied embeddings), trained with AdamW under bf16 autocast on real text: the training bytes of Python's own
standard-library sources (``tools/lm/corpus.py``, vocabulary 256), the same batches for every run. Each
block is compiled on its own (regional compilation: one compile serves all layers), the embedding
and the loss run eagerly. The GEMMs of every block are compressed (``keep_first_last=False``: the
first and last GEMMs of the model, embedding and LM head, are outside the blocks and stay bf16).

Per configuration: backend inductor, then backend nm with the recipes (nmcompile.recipes) ``luq4 + sawb4`` (FP8
on sm89+, INT8 on sm80-88), ``luq4 + absmax8`` (INT8 GEMMs everywhere: absmax has no float8 form),
``mvue 2:4 wgrad+dgrad`` and ``mvue 2:4 wgrad+dgrad + luq4 + sawb4``, each with ``lowering="native"``. Reported:
compile time (first step), median step time over the steps after the first 10 (CUDA-synchronized
wall clock), its ratio to inductor's, the kernels the nm pass chose, and the mean loss of the last
20 steps next to inductor's (the loss curves go to the JSON).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from typing import Optional

import torch

import nmcompile
from nmcompile.examples import GPT
from nmcompile.kernels.gemm import cusparselt_version
from nmcompile.recipes import recipe

from lm.corpus import fixed_batches, stdlib_corpus  # tools/lm: the LM tools' shared parts

CONFIGS = {  # name -> options (None: Inductor alone), from nmcompile.recipes
    "inductor": None,
    "luq+sawb": recipe("luq4 + sawb4").options,
    "luq+absmax8": recipe("luq4 + absmax8").options,  # every GEMM on int8 (no FP8 form)
    "2:4": recipe("mvue 2:4 wgrad+dgrad").options,
    "2:4+luq+sawb": recipe("mvue 2:4 wgrad+dgrad + luq4 + sawb4").options,
}


def train(name: str, options: Optional[dict], args, data: list, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = GPT(256, args.d, args.layers, args.heads, args.seq, sdpa=True, tied=True).to(device)
    torch._dynamo.reset()
    for block in model.blocks:
        if options is None:
            block.compile(backend="inductor")
        else:
            block.compile(backend="nm", options={**options, "lowering": args.lowering, "keep_first_last": False})
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    losses, times = [], []
    kernels: dict = {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with nmcompile.backend.recording() as records:
        for step, tokens in enumerate(data):
            tokens = tokens.to(device, non_blocking=True)
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            if step == 0:
                for r in records:
                    if r.transforms:
                        kernels[r.kernel] = kernels.get(r.kernel, 0) + 1
            if step % 20 == 0:
                print(f"  {name:14s} step {step:4d} loss {losses[-1]:.4f} {times[-1] * 1e3:8.1f} ms",
                      file=sys.stderr, flush=True)
    steady = times[10:] or times
    notes = sorted({r.kernel_note for r in records if r.transforms and r.kernel_note})
    return {"name": name, "options": options, "compile_s": times[0], "step_ms": statistics.median(steady) * 1e3,
            "loss_last20": statistics.mean(losses[-20:]), "losses": losses, "kernels": kernels, "fallbacks": notes}


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--lowering", default="native", choices=["native", "auto", "emulate"])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    p.add_argument("--smoke", action="store_true", help="a tiny decoder on CPU for a few steps: checks the script")
    p.add_argument("--out", help="write the results (loss curves included) as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
        args.layers, args.d, args.heads, args.seq, args.batch, args.steps = 2, 64, 4, 64, 2, 12
    elif not torch.cuda.is_available():
        print("bench_train: no CUDA device; nothing measured (use --smoke to check the script on CPU)")
        if args.out:
            json.dump({"skipped": "no CUDA device"}, open(args.out, "w"))
        return 0
    else:
        device = torch.device("cuda")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    data = fixed_batches(stdlib_corpus()[0], args.steps, args.batch, args.seq)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = []
    for name in names:
        try:
            results.append(train(name, CONFIGS[name], args, data, device))
        except Exception as err:  # noqa: BLE001  (report it, go on with the next configuration)
            traceback.print_exc()
            results.append({"name": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
        if args.out:  # after each configuration: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump({"meta": {"torch": torch.__version__, "device": gpu, "cusparselt": cusparselt_version(),
                                    "args": vars(args)}, "results": results}, f, indent=1)
    base = next((r for r in results if r["name"] == "inductor" and "step_ms" in r), None)
    print(f"bench_train on {gpu}, torch {torch.__version__}, cuSPARSELt {cusparselt_version()}: "
          f"{args.layers} layers, d={args.d}, seq {args.seq}, batch {args.batch}, {args.steps} steps, bf16 autocast\n")
    print("| config | compile s | step ms | speed vs inductor | loss (last 20) | vs inductor | kernels |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error']} | | | | | |")
            continue
        speed = f"{base['step_ms'] / r['step_ms']:.2f}×" if base else "?"
        dloss = f"{r['loss_last20'] - base['loss_last20']:+.4f}" if base else "?"
        kern = ", ".join(f"{k} ×{v}" for k, v in sorted(r["kernels"].items())) or "-"
        print(f"| {r['name']} | {r['compile_s']:.1f} | {r['step_ms']:.1f} | {speed} | {r['loss_last20']:.4f} | "
              f"{dloss} | {kern} |")
    for r in results:
        for note in r.get("fallbacks", []):
            print(f"  {r['name']}: dense where {note}")
    return 0 if results and all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
