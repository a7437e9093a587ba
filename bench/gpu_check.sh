#!/usr/bin/env bash
# One-shot GPU check of the kernels (about 5 minutes on one H100): the kernel tests on CUDA, then the
# three benches at paper scale. The machine's own torch / triton stay as they are.
#   bash bench/gpu_check.sh          results in ${OUT:-bench/results}/kernels_gpu.{csv,md,log}
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
CSV="$OUT_DIR/kernels_gpu.csv"
MD="$OUT_DIR/kernels_gpu.md"
PY="$(command -v python || command -v python3)"
export PYTHONUNBUFFERED=1
status=0
T_START=$SECONDS

# step NAME LIMIT_S CMD...: run with a time limit, log to $OUT_DIR/kernels_gpu_NAME.log, show its tail,
# and keep going on failure (the script's exit status reports it). With PARTIAL_OK=1 a step cut by its
# time limit counts as partial, not failed (benches append each CSV row as soon as it is measured).
step() {
  local name=$1 limit=$2 log="$OUT_DIR/kernels_gpu_$1.log" t0=$SECONDS rc=0
  shift 2
  echo "=== $name (limit ${limit} s, at $((SECONDS - T_START)) s)"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
  tail -n "${TAIL_LINES:-25}" "$log"
  if [ "$rc" -eq 0 ]; then
    echo "=== $name ok in $((SECONDS - t0)) s"
  elif [ "$rc" -eq 124 ] && [ "${PARTIAL_OK:-0}" = 1 ]; then
    echo "=== $name PARTIAL: cut at its ${limit} s limit; the rows measured so far are kept"
  else
    echo "=== $name FAILED (rc=$rc, $((SECONDS - t0)) s; 124 = time limit)"
    status=1
  fi
}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target .cache/gpu_site .whl/*.whl
  export PYTHONPATH="$PWD/.cache/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
# --no-build-isolation: the GPU machine reaches no package index, so build with its own setuptools.
TAIL_LINES=3 step install 60 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
"$PY" - <<'PYEOF'
import torch, triton
print(f"torch {torch.__version__} | triton {triton.__version__} | cuda {torch.version.cuda} | "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE'}")
PYEOF

# The three test files run side by side: most of their time is Triton compiling kernel variants, one
# CPU core each.
pytest_all() {
  local pids=() rc=0 f
  for f in attention_pool cpc_loss catalog_cross_entropy; do
    "$PY" -m pytest -q -p no:cacheprovider --durations=5 "tests/test_$f.py" >"$OUT_DIR/kernels_gpu_pytest_$f.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  for f in attention_pool cpc_loss catalog_cross_entropy; do
    echo "--- tests/test_$f.py"
    grep -E "tests run on|FAILED|ERROR|Error|passed|failed" "$OUT_DIR/kernels_gpu_pytest_$f.log" | tail -n 30
  done
  return "$rc"
}
export -f pytest_all
export PY OUT_DIR
TAIL_LINES=100 step pytest 150 bash -c pytest_all

rm -f "$CSV"
export PARTIAL_OK=1
step bench_attention_pool 40 "$PY" bench/bench_attention_pool.py --scale paper --csv "$CSV" --budget-s 25
step bench_cpc_loss 40 "$PY" bench/bench_cpc_loss.py --scale paper --csv "$CSV" --budget-s 25
step bench_catalog_cross_entropy 50 "$PY" bench/bench_catalog_cross_entropy.py --scale paper --csv "$CSV" \
  --budget-s 35

echo "=== all benches ($((SECONDS - T_START)) s so far)"
if [ -s "$CSV" ]; then
  "$PY" bench/kernel_bench_common.py --table "$CSV" --md "$MD"
else
  echo "no bench rows were written"
  status=1
fi
echo "=== done in $((SECONDS - T_START)) s, status $status (logs: $OUT_DIR/kernels_gpu_*.log)"
exit "$status"
