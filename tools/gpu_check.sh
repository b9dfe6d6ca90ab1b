#!/usr/bin/env bash
# The one prepared GPU check for lowering="native" (issue 11): the tests marked `cuda`, then
# tools/bench_gemm.py and tools/bench_train.py, on a fresh GPU machine with torch 2.11 and nothing
# else installed, in under 8 minutes. Results (at most 8 files) go to $1, else $OUT, else ./gpu-check.
#
#   bash tools/gpu_check.sh [OUT_DIR]
#
# Without a GPU every step still runs: the cuda tests skip and the benchmarks run their --smoke
# variants on CPU, so the script itself is tested end to end on any machine (tests/tools/test_gpu_check.py).
# LIMIT_SCALE=k multiplies every step's time limit by k: the test sets it, since a CPU shared with other jobs can
# take longer than the device's budget allows without anything being wrong.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu-check}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
start=$SECONDS
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT_DIR/NAME.log
  local name=$1 limit=$(($2 * ${LIMIT_SCALE:-1}))
  shift 2
  echo "== $name (limit ${limit}s, at $((SECONDS - start))s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT_DIR/$name.log"
  [ $rc -eq 0 ] || { echo "!! $name exited with $rc"; status=1; }
}

# nmcompile itself, without touching the network or the installed torch
if ! "$PY" -c "import nmcompile" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT_DIR/install.log" 2>&1 \
    || { echo "!! pip install -e . failed:"; tail -n 20 "$OUT_DIR/install.log"; exit 2; }
fi

"$PY" - >"$OUT_DIR/env.json" <<'EOF'
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None}
try:
    info["cusparselt"] = torch.backends.cusparselt.version()
except Exception as err:
    info["cusparselt"] = f"unavailable ({type(err).__name__})"
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
print(json.dumps(info, indent=1))
EOF
cat "$OUT_DIR/env.json"

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  GEMM_ARGS=(--quick)
  TRAIN_ARGS=(--steps 200)
else
  echo "(no CUDA device: the cuda tests skip, the benchmarks run their CPU smoke variants)"
  GEMM_ARGS=(--smoke)
  TRAIN_ARGS=(--smoke --configs inductor,2:4+luq+sawb)
fi

# 140 + 110 + 200 s of limits: under 8 minutes with the start-up; each benchmark writes its JSON as it
# goes, so one cut short still returns what it measured. The tests: those that need CUDA, and the
# Triton kernels against the CPU results (on the device; in the interpreter without one).
step cuda_tests 140 "$PY" -m pytest -q -m "cuda or triton" -p no:cacheprovider tests
step bench_gemm 110 "$PY" tools/bench_gemm.py "${GEMM_ARGS[@]}" --out "$OUT_DIR/bench_gemm.json"
step bench_train 200 "$PY" tools/bench_train.py "${TRAIN_ARGS[@]}" --out "$OUT_DIR/bench_train.json"

echo "== done in $((SECONDS - start))s, results in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit $status
