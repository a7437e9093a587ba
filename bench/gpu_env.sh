# Set-up shared by the GPU scripts (sourced, not run), from the repository root. The caller sets WORK (scratch
# folder) and LOG_NAME (log file name under the output folder) first. Defines OUT_DIR (${OUT:-bench/results}),
# PY, LOG, T0 and log(); makes OUT_DIR and WORK; exports offline Hugging Face settings and, when .gpu/tokenizer
# exists, TRANSREC_TOKENIZER_DIR (the all-MiniLM-L6-v2 tokenizer files for the shards' vocabulary check).
: "${WORK:?set WORK before sourcing bench/gpu_env.sh}" "${LOG_NAME:?set LOG_NAME before sourcing bench/gpu_env.sh}"
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR" "$WORK"
PY="$(command -v python3)"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d .gpu/tokenizer ]; then export TRANSREC_TOKENIZER_DIR="${TRANSREC_TOKENIZER_DIR:-$PWD/.gpu/tokenizer}"; fi
LOG="$OUT_DIR/$LOG_NAME"
T0=$SECONDS
log() { echo "[$((SECONDS - T0)) s] $*" | tee -a "$LOG"; }
