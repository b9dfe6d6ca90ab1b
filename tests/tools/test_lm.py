"""tools/lm, the LM tools' shared parts: the corpus, the byte-level GPT (nmcompile.examples.GPT) and the one training
loop with its hooks (the noise monitor, the precision switch, the snapshot an FNT branch starts from)."""
from __future__ import annotations

import argparse
import ast
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))  # where a tool's own directory puts it when it runs as a script
from lm import corpus  # noqa: E402
from lm.train import Snapshot, add_training_arguments, branch, byte_gpt, train  # noqa: E402

TOOLS = sorted((ROOT / "tools").rglob("*.py"))


def tiny_args(**over) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_training_arguments(parser, d=16, warmup=0.25, every=2)
    args = parser.parse_args(["--batch", "2", "--block", "8", "--layers", "1", "--heads", "2", "--eval-batches", "2"])
    args.steps = 4
    vars(args).update(over)
    return args


def tiny_data(args) -> dict:
    text = torch.arange(4096) % 251  # the loop's logic, not the corpus, is under test here
    val = corpus.validation(text, args.eval_batches, args.batch, args.block)
    return {"train": text, "val": val, "val_small": val[:1]}


def test_corpus_split_is_by_file_and_stable():
    train, val, meta = corpus.stdlib_corpus()
    again = corpus.stdlib_corpus()[2]
    assert meta == again and meta["train_bytes"] == len(train) and meta["validation_bytes"] == len(val)
    assert 0.03 < meta["validation_bytes"] / (meta["train_bytes"] + meta["validation_bytes"]) < 0.3
    assert int(train.max()) < 256 and int(train.min()) >= 0


def test_windows_are_the_next_bytes():
    text = torch.arange(100)
    x, y = corpus.random_batch(text, torch.Generator().manual_seed(0), 3, 5)
    assert x.shape == y.shape == (3, 5) and torch.equal(y, x + 1)
    (fixed,) = corpus.fixed_batches(text, 1, 3, 5)
    assert fixed.shape == (3, 6) and torch.equal(fixed[:, 1:], fixed[:, :-1] + 1)


def test_no_tool_edits_sys_path():
    for path in TOOLS:
        tree = ast.parse(path.read_text())
        edits = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
                 and isinstance(n.value, ast.Name) and n.value.id == "sys"]
        assert not edits, f"{path.relative_to(ROOT)} uses sys.path at line(s) {edits}"


def test_the_tools_build_no_transformer_of_their_own():
    # the GPT, its block and its attention are nmcompile.examples'; the tools only wrap models (bench_step_cpu's
    # byte-embedding stack of those blocks, and Hugging Face's GPT-2)
    modules = {}
    for path in TOOLS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("Module") for b in node.bases):
                modules[node.name] = path.name
    assert modules == {"Net": "bench_step_cpu.py", "GPT2": "bench_step_cpu.py"}


def test_the_byte_gpt_keeps_the_parameter_names_results_record():
    names = list(byte_gpt(0, tiny_args()).state_dict())
    assert names[:2] == ["tok.weight", "pos.weight"] and names[-3:] == ["ln.weight", "ln.bias", "head.weight"]
    assert "blocks.0.attn.qkv.weight" in names and "blocks.0.out.bias" in names


class Hook:
    """Records what the loop hands to a monitor (measure) and to a switch (on_step)."""

    def __init__(self):
        self.calls = []

    def measure(self, x, y, step):
        self.calls.append(("measure", step, x.clone()))
        return self

    def on_step(self, step, x, y):
        self.calls.append(("on_step", step, x.clone()))

    def summary(self):
        return {}

    gemms = ()


def test_the_loop_calls_its_hooks_and_keeps_a_snapshot():
    args = tiny_args()
    data = tiny_data(args)
    model = byte_gpt(0, args)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor, switch = Hook(), Hook()
    before = {}

    def compiled(x, y):  # the step's forward: keep the weights it starts from
        before.setdefault(len(before), {k: v.clone() for k, v in model.state_dict().items()})
        return model(x, y)

    record, snapshot = train(model, compiled, opt, data, args, torch.Generator().manual_seed(0), monitor=monitor,
                             switch=switch, snapshot_at=3)
    assert [c[1] for c in switch.calls] == [0, 1, 2, 3] and [c[1] for c in monitor.calls] == [0, 2]
    assert all(torch.equal(m[2], s[2]) for m, s in zip(monitor.calls, switch.calls[::2]))  # the same batch
    assert [s for s, _ in record["curve"]] == [0, 2, 4] and record["noise"][0]["step"] == 0
    assert not record["diverged"] and record["final_bpb"] > 0
    # the validation runs of steps 0 and 2 also call compiled, before the step's own forward
    state = before[5]  # calls: eval 0, step 0, step 1, eval 2, step 2, step 3 (the snapshot's step)
    assert all(torch.equal(state[k], v) for k, v in snapshot.model.items()) and snapshot.rng is not None


def test_a_branch_from_a_snapshot_with_its_rng_is_repeatable():
    args = tiny_args()
    data = tiny_data(args)
    model = byte_gpt(0, args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    snapshot = Snapshot.take(model, opt, torch.Generator().manual_seed(1), lr=1e-3, rng=True)
    options = {"quant": "sr", "bits": 4, "inner": "aot_eager"}  # stochastic rounding: draws from the global RNG
    runs = []
    for seed in (123, 456):  # another global RNG state each time: the snapshot's is restored
        torch.manual_seed(seed)
        branch(model, snapshot, options, 2, data, args)
        runs.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], snapshot.model[k]) for k in runs[0])  # it trained
