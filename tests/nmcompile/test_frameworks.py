"""docs/frameworks.md, executed: every Python script on the page runs as written (in its own process, as a user
would run it) with the real packages, and checks what the page says it shows. Also the one thing the page says
does not work: the Hugging Face Trainer's ``torch_compile_backend="nm"``."""
from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "frameworks.md"
SCRIPTS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
THIRD_PARTY = ("transformers", "lightning", "torchtitan", "safetensors", "accelerate")


@functools.lru_cache(maxsize=None)
def _torchtitan_refuses() -> str:
    """Why torchtitan's parallelisms do not import here ("" when they do): each release follows a recent torch
    (0.3.0 needs torch.distributed.fsdp.DataParallelMeshDims, which torch 2.11 does not have)."""
    proc = subprocess.run([sys.executable, "-c", "import torchtitan.distributed.fsdp"], capture_output=True, text=True,
                          cwd=pathlib.Path.home(), timeout=300)
    return "" if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1]


def _title(script: str) -> str:
    return script.splitlines()[0].lstrip("# ").split(":")[0]


def _runs():
    for script in SCRIPTS:
        devices = ("1", "2") if "DEVICES" in script else (None,)
        for d in devices:
            yield pytest.param(script, d, id=_title(script) + (f" DEVICES={d}" if d else ""))


def test_the_page_has_its_scripts():
    assert [_title(s) for s in SCRIPTS] == [
        "Options without a dict", "Hugging Face Trainer", "Lightning", "Per-block compilation", "torchtitan",
        "torchtitan with FSDP2 on CPU", "Mixture of experts in transformers"]


@pytest.mark.slow
@pytest.mark.parametrize("script,devices", list(_runs()))
def test_script_runs_as_written(script, devices, tmp_path):
    imported = set(re.findall(r"^\s*(?:from|import) (\w+)", script, flags=re.M))
    if "Trainer(" in script and "transformers" in imported:
        imported.add("accelerate")  # transformers' Trainer runs on it
    missing = [m for m in THIRD_PARTY if m in imported and importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    if "torchtitan" in imported and _torchtitan_refuses():
        pytest.skip(f"torchtitan does not import on this torch: {_torchtitan_refuses()}")
    path = tmp_path / "script.py"  # a file: DDP starts its other processes by running it again
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("NMCOMPILE_OPTIONS", "TORCH_TRACE")}
    if devices:
        env["DEVICES"] = devices
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


REFUSAL = """
import transformers
args = transformers.TrainingArguments(output_dir="unused", torch_compile_backend="nm", use_cpu=True, report_to=[])
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
try:
    transformers.Trainer(model=model, args=args)
except ValueError as err:
    print(err)
"""


def test_hf_trainer_refuses_the_backend_name():
    """The page says to compile the model instead: accelerate takes only the names of its DynamoBackend enum.
    Started at the repository's root, as a newcomer's ``python -c`` would be: transformers imports the installed
    package named ``kernels``, which the root's ``kernels/`` folder no longer shadows (tests/test_layout.py)."""
    for module in ("transformers", "accelerate"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed")
    proc = subprocess.run([sys.executable, "-c", REFUSAL], cwd=PAGE.parents[1], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "is not a valid DynamoBackend" in proc.stdout, proc.stdout + proc.stderr[-3000:]
