#!/usr/bin/env bash
# Weight-algorithm sweep template: RTN, GPTQ and AWQ for every (model, bits, group size), in memory
# (quantize, then evaluate, one main.py run each) or layer-wise (LAYER_WISE=1: write a fake-quantized
# checkpoint block by block into SAVE_DIR/<model>-w<bits>-g<group>-<algo>[-<dtype>], then evaluate it).
# Edit the variables below, or override any of them from the environment (lists: space-separated),
# e.g.  WEIGHT_ALGO_LIST="rtn gptq" W_BITS_LIST="4 3" N_CALIB=32 bash scripts/test_ppl_weight_algo_template.sh
# Finished work is skipped (a result file holding every dataset; a complete layer-wise checkpoint),
# an interrupted layer-wise checkpoint resumes at its next block, a failing setting is logged under
# $RESULTS_DIR/logs/ and the sweep goes on; a summary and the report table come at the end.
# Values are checked before anything runs (a bad one is refused naming the variable, exit 2); no value
# is ever expanded to file names (set -f). A "complete" checkpoint is skipped only once every shard and
# the index are verified (size, header, sha256 as recorded); otherwise main.py redoes what is damaged.
set -uo pipefail
set -f
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=lib/sweep.sh
source scripts/lib/sweep.sh

read -r -a model_list <<<"${MODEL_LIST:-smollm2-135m}"
read -r -a w_bits_list <<<"${W_BITS_LIST:-4}"
read -r -a w_group_size_list <<<"${W_GROUP_SIZE_LIST:-128}"
read -r -a weight_algo_list <<<"${WEIGHT_ALGO_LIST:-rtn gptq awq}"
wq_dtype="${WQ_DTYPE:-int}"                      # int | bitmod | fp4_e2m1
calib_dataset="${CALIB_DATASET:-wiki_sample}"
n_calib="${N_CALIB:-128}"
calib_seq_len="${CALIB_SEQ_LEN:-512}"
read -r -a gptq_flags <<<"${GPTQ_FLAGS:-}"       # e.g. "--act_order --static_groups"
n_grid="${N_GRID:-20}"                           # AWQ's grid points
layer_wise="${LAYER_WISE:-0}"                    # 1: --layer_wise into SAVE_DIR, then evaluate the checkpoint
SAVE_DIR="${SAVE_DIR:-quantized}"
offload="${OFFLOAD_ACTIVATIONS:-0}"              # 1: --offload_activations (layer-wise GPTQ / AWQ)
datasets="${DATASETS-wiki_sample}"               # empty: quantize only (layer-wise)
n_windows="${N_WINDOWS:-2}"
seq_len="${SEQ_LEN:-2048}"
RESULTS_DIR="${RESULTS_DIR:-results/sweep_weight_algo}"

sweep_check_match MODEL_LIST . "model names or directories" "${model_list[@]}"
sweep_check_match W_BITS_LIST "$SWEEP_POS_INT" "positive integers" "${w_bits_list[@]}"
sweep_check_match W_GROUP_SIZE_LIST "$SWEEP_GROUP_SIZE" "-1 or positive integers" "${w_group_size_list[@]}"
# the algorithm names are main.py's (a registry): an unknown one is a logged failure, not a refusal here
sweep_check_match WEIGHT_ALGO_LIST '^[A-Za-z0-9_-]+$' "algorithm names (main.py --weight_algo: rtn, gptq, awq, ...)" \
  "${weight_algo_list[@]}"
sweep_check_choice WQ_DTYPE "int bitmod fp4_e2m1" "$wq_dtype"
sweep_check_match N_CALIB "$SWEEP_POS_INT" "a positive integer" "$n_calib"
sweep_check_match CALIB_SEQ_LEN "$SWEEP_POS_INT" "a positive integer" "$calib_seq_len"
sweep_check_match N_GRID "$SWEEP_POS_INT" "a positive integer" "$n_grid"
sweep_check_match N_WINDOWS "$SWEEP_POS_INT" "a positive integer" "$n_windows"
sweep_check_match SEQ_LEN "$SWEEP_POS_INT" "a positive integer" "$seq_len"
case "$layer_wise" in 0|1) ;; *) echo "LAYER_WISE=$layer_wise: allowed values are 0, 1" >&2; exit 2 ;; esac
case "$offload" in 0|1) ;; *) echo "OFFLOAD_ACTIVATIONS=$offload: allowed values are 0, 1" >&2; exit 2 ;; esac

sweep_init "$RESULTS_DIR"
eval_flags=(--seq_len "$seq_len" --n_windows "$n_windows")
[[ -n "$datasets" ]] && eval_flags+=(--datasets "$datasets")

algo_flags() {  # algo
  local flags=(--weight_algo "$1")
  if [[ "$1" != rtn ]]; then
    flags+=(--calib_dataset "$calib_dataset" --n_calib "$n_calib" --calib_seq_len "$calib_seq_len")
  fi
  [[ "$1" == gptq ]] && flags+=("${gptq_flags[@]}")
  [[ "$1" == awq ]] && flags+=(--n_grid "$n_grid")
  echo "${flags[@]}"
}

quantize_layer_wise() {  # label out flags...: resume or skip a layer-wise checkpoint, record the outcome
  local label="$1" out="$2"; shift 2
  local log="$SWEEP_LOG_DIR/$(_sweep_log_name "$label").log"
  # complete and intact (every shard and the index as the run state records them)
  if [[ -f "$out/wkvaq_layerwise.json" ]] && "$SWEEP_PY" -c 'import sys
from wkvaq_quant.weights.layerwise import check_complete
sys.exit(0 if check_complete(sys.argv[1]) is None else 1)' "$out" 2>/dev/null; then
    echo "[sweep] skipped $label (complete: $out)"; SWEEP_OUTCOMES+=("skipped|$label|$out"); return 0
  fi
  echo "[sweep] running $label"
  if "$SWEEP_PY" main.py "$@" --layer_wise --save_quant "$out" --no_progress >"$log" 2>&1; then
    echo "[sweep] done    $label -> $out"; SWEEP_OUTCOMES+=("done|$label|$out"); return 0
  fi
  echo "[sweep] FAILED  $label ($(tail -n 1 "$log"); log: $log)"
  SWEEP_OUTCOMES+=("failed|$label|$log"); SWEEP_FAILED=$((SWEEP_FAILED + 1)); return 1
}

for model in "${model_list[@]}"; do
  for bits in "${w_bits_list[@]}"; do for group in "${w_group_size_list[@]}"; do
    for algo in "${weight_algo_list[@]}"; do
      suffix=""; [[ "$wq_dtype" != int ]] && suffix="-$wq_dtype"
      label="W${bits}g${group}${suffix}-${algo}"
      read -r -a flags <<<"--w_bits $bits --w_group_size $group --w_dtype $wq_dtype $(algo_flags "$algo")"
      if [[ "$layer_wise" == 0 ]]; then
        sweep_run "$model $label" --model "$model" "${flags[@]}" "${eval_flags[@]}"
        continue
      fi
      out="$SAVE_DIR/$(basename "$model")-w$bits-g$group-$algo$suffix"
      lw_flags=(--model "$model" "${flags[@]}")
      [[ "$offload" == 1 && "$algo" != rtn ]] && lw_flags+=(--offload_activations)
      quantize_layer_wise "quantize $(basename "$model") $label" "$out" "${lw_flags[@]}" || continue
      [[ -n "$datasets" ]] && sweep_run "evaluate $(basename "$out")" --model "$out" "${eval_flags[@]}"
    done
  done; done
done

sweep_summary
