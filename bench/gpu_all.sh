#!/usr/bin/env bash
# Every GPU check in one go (about 8 minutes on one H100), for a machine whose own torch / triton stay as
# they are and that reaches no package registry. Needs, beside the repository:
#   .whl/            wheels of deepspeed, pydantic(+core, annotated-types, typing-inspection), hjson,
#                    webdataset, braceexpand (see bench/README.md for the download commands)
#   .gpu/tokenizer/  the all-MiniLM-L6-v2 tokenizer files (vocab.txt, tokenizer*.json, config.json)
# Steps: install; then, side by side (correctness only, no timings): the kernel tests on CUDA, the decoder
# tests on CUDA, and a tiny two-stage training run on CUDA; then, one after the other (timings): the kernel
# benches at paper scale and bench/throughput.py at the paper preset. Results land in ${OUT:-bench/results}.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=.cache/gpu_work LOG_NAME=gpu_summary.log
source bench/gpu_env.sh

python3 -m pip install -q --no-index --no-deps --no-compile --target .cache/gpu_site .whl/*.whl 2>&1 | tail -3
export PYTHONPATH="$PWD/.cache/gpu_site"
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/install.log" 2>&1 || log "editable install failed (the transrec wheel in .whl/ is in .cache/gpu_site)"
"$PY" -c "import torch, triton, deepspeed, webdataset; print('torch', torch.__version__, 'triton', triton.__version__, \
'deepspeed', deepspeed.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"

log "building MovieLens shards"
timeout 120 "$PY" -m transrec.data_shards.build --dataset movielens-100k-mm --source data/movielens-100k-mm --modality mixed \
  --out "$WORK/ml" --max-tokens 32 >"$WORK/build.log" 2>&1 || log "shard build FAILED: $(tail -3 "$WORK/build.log")"

# -- correctness, side by side ---------------------------------------------------------------------------------
pids=()
(timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_attention_pool.py tests/test_cpc_loss.py \
  tests/test_catalog_cross_entropy.py tests/test_kernel_tuning.py >"$WORK/kernel_tests.log" 2>&1; echo "rc=$?" >>"$WORK/kernel_tests.log") &
pids+=($!)
(timeout 200 "$PY" -m pytest -q -s -p no:cacheprovider tests/test_decode.py tests/test_eval_stream.py \
  tests/test_device_prefetch.py \
  >"$WORK/decode_tests.log" 2>&1; \
  echo "rc=$?" >>"$WORK/decode_tests.log") &
pids+=($!)
(timeout 200 "$PY" trainer/main.py --preset tiny --text-encoder bert-base-random-init --shards "$WORK/ml" \
  --run-dir "$WORK/run_tiny" --ds_config ds_configs/zero2_bf16.json --set model.image_size=64 >"$WORK/train_tiny.log" 2>&1; \
  echo "rc=$?" >>"$WORK/train_tiny.log") &
pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
for f in kernel_tests decode_tests train_tiny; do
  log "--- $f"
  grep -aE "tests run on|passed|failed|FAILED|Error|rc=|after stage|popularity|CUDA" "$WORK/$f.log" | tail -n 25 | tee -a "$LOG"
done
cp "$WORK/run_tiny/metrics.json" "$OUT_DIR/gpu_train_tiny_metrics.json" 2>/dev/null

# -- timings, one after the other ----------------------------------------------------------------------------
CSV="$OUT_DIR/kernels_gpu.csv"
rm -f "$CSV"
for op in attention_pool cpc_loss catalog_cross_entropy; do
  log "bench $op"
  timeout 60 "$PY" bench/bench_$op.py --scale paper --csv "$CSV" --budget-s 35 >"$WORK/bench_$op.log" 2>&1 \
    || log "bench $op stopped (rc=$?); rows measured so far are kept"
done
[ -s "$CSV" ] && "$PY" bench/kernel_bench_common.py --table "$CSV" --md "$OUT_DIR/kernels_gpu.md" | tee -a "$LOG"

if [ -f bench/gpu_throughput.sh ]; then
  log "throughput (paper preset)"
  mkdir -p "$WORK/tp"
  SHARDS="$WORK/ml" OUT="$WORK/tp" timeout 220 bash bench/gpu_throughput.sh >"$WORK/throughput.log" 2>&1 \
    || log "throughput stopped (rc=$?)"
  tail -n 40 "$WORK/throughput.log" | tee -a "$LOG"
  # At most 8 files come back from the GPU machine: the figures go to OUT, the logs into one archive.
  cp "$WORK"/tp/throughput_gpu.json "$WORK"/tp/throughput_gpu.md "$WORK"/tp/throughput.csv "$OUT_DIR"/ 2>/dev/null
  cp "$WORK"/tp/*.log "$WORK"/ 2>/dev/null
fi
for f in "$OUT_DIR"/kernels_gpu_*.log; do [ -e "$f" ] && mv "$f" "$WORK"/; done
tar czf "$OUT_DIR/gpu_logs.tar.gz" -C "$WORK" $(cd "$WORK" && ls *.log) 2>/dev/null
log "done"
