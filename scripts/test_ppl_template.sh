#!/usr/bin/env bash
# Perplexity sweep template: the combinations P3-LLM's template runs, for every entry of the lists.
#   FP; KV-only (with and without k-scale); weight-only; full W/A/KV(/P) (with and without k-scale).
# Edit the variables below, or override any of them from the environment (lists: space-separated),
# e.g.  K_BITS_LIST="4 3 2" N_WINDOWS=8 bash scripts/test_ppl_template.sh
# Finished settings (their result file holds every dataset) are skipped; a failing setting is logged
# under $RESULTS_DIR/logs/ and the sweep goes on; a summary and the report table come at the end.
# The defaults run on the embedded model and corpus in a few minutes on a laptop CPU.
# Values are checked before anything runs (a bad one, e.g. K_BITS_LIST='*' or SWEEP_PARTS='fp,kv', is
# refused naming the variable, exit 2); no value is ever expanded to file names (set -f).
set -uo pipefail
set -f
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=lib/sweep.sh
source scripts/lib/sweep.sh

read -r -a model_list <<<"${MODEL_LIST:-smollm2-135m}"
read -r -a w_bits_list <<<"${W_BITS_LIST:-4}"
read -r -a w_group_size_list <<<"${W_GROUP_SIZE_LIST:-128}"
wq_dtype="${WQ_DTYPE:-int}"                      # int | bitmod | fp4_e2m1
a_bits="${A_BITS:-8}"                            # FP8 E4M3 per token in the full setting (16 = off)
read -r -a k_bits_list <<<"${K_BITS_LIST:-4}"
read -r -a v_bits_list <<<"${V_BITS_LIST:-4}"
read -r -a k_group_size_list <<<"${K_GROUP_SIZE_LIST:-64}"
read -r -a v_group_size_list <<<"${V_GROUP_SIZE_LIST:-64}"
read -r -a kv_quant_method_list <<<"${KV_QUANT_METHOD_LIST:-KTVT}"
read -r -a kv_residual_len_list <<<"${KV_RESIDUAL_LEN_LIST:-default}"  # default: the method's (KTVT 1, KCVT 0)
read -r -a p_bits_list <<<"${P_BITS_LIST:-16}"   # full setting only (8 = E4M4; 16 = off)
apply_k_scale="${APPLY_K_SCALE:-both}"           # on | off | both
k_quant_post_rope="${K_QUANT_POST_ROPE:-off}"    # on | off
datasets="${DATASETS-wiki_sample}"                # empty: no perplexity (lm-eval sweeps)
n_windows="${N_WINDOWS:-2}"
seq_len="${SEQ_LEN:-2048}"
AWQ_DIR="${AWQ_DIR:-}"                           # optional: fake-quantized AWQ weights, see below
RESULTS_DIR="${RESULTS_DIR:-results/sweep_ppl}"
read -r -a sweep_parts <<<"${SWEEP_PARTS:-fp kv w full}"  # which groups of settings to run

sweep_check_match MODEL_LIST . "model names or directories" "${model_list[@]}"
sweep_check_match W_BITS_LIST "$SWEEP_POS_INT" "positive integers" "${w_bits_list[@]}"
sweep_check_match W_GROUP_SIZE_LIST "$SWEEP_GROUP_SIZE" "-1 or positive integers" "${w_group_size_list[@]}"
sweep_check_choice WQ_DTYPE "int bitmod fp4_e2m1" "$wq_dtype"
sweep_check_match A_BITS "$SWEEP_POS_INT" "a positive integer (16 = off)" "$a_bits"
sweep_check_match K_BITS_LIST "$SWEEP_POS_INT" "positive integers" "${k_bits_list[@]}"
sweep_check_match V_BITS_LIST "$SWEEP_POS_INT" "positive integers" "${v_bits_list[@]}"
sweep_check_match K_GROUP_SIZE_LIST "$SWEEP_GROUP_SIZE" "-1 or positive integers" "${k_group_size_list[@]}"
sweep_check_match V_GROUP_SIZE_LIST "$SWEEP_GROUP_SIZE" "-1 or positive integers" "${v_group_size_list[@]}"
sweep_check_choice KV_QUANT_METHOD_LIST "KTVT KCVT" "${kv_quant_method_list[@]}"
sweep_check_match KV_RESIDUAL_LEN_LIST '^(default|0|[1-9][0-9]*)$' "default or integers >= 0" \
  "${kv_residual_len_list[@]}"
sweep_check_match P_BITS_LIST "$SWEEP_POS_INT" "positive integers (8 = E4M4, 12 = E5M7, 16 = off)" "${p_bits_list[@]}"
sweep_check_match N_WINDOWS "$SWEEP_POS_INT" "a positive integer" "$n_windows"
sweep_check_match SEQ_LEN "$SWEEP_POS_INT" "a positive integer" "$seq_len"
sweep_check_choice SWEEP_PARTS "fp kv w full" "${sweep_parts[@]}"
case "$apply_k_scale" in on) kscale_variants=(1) ;; off) kscale_variants=(0) ;; both) kscale_variants=(0 1) ;;
  *) echo "APPLY_K_SCALE=$apply_k_scale: allowed values are on, off, both" >&2; exit 2 ;; esac
case "$k_quant_post_rope" in on) rope_flags=(--k_quant_post_rope) ;; off) rope_flags=() ;;
  *) echo "K_QUANT_POST_ROPE=$k_quant_post_rope: allowed values are on, off" >&2; exit 2 ;; esac

has_part() { [[ " ${sweep_parts[*]} " == *" $1 "* ]]; }

# AWQ_DIR/<model>-w<bits>-g<group>[-<dtype>] (the name scripts/awq/run_awq_save_4b_model.sh gives
# its checkpoints in SAVE_DIR; no suffix for int), when it exists, is loaded over the model for the
# weight settings (--awq_model_path_lp); otherwise RTN.
weight_flags() {  # model w_bits w_group_size: sets the array wflags
  wflags=(--w_bits "$2" --w_group_size "$3" --w_dtype "$wq_dtype")
  local suffix=""; [[ "$wq_dtype" != int ]] && suffix="-$wq_dtype"
  local awq="$AWQ_DIR/$(basename "$1")-w$2-g$3$suffix"
  if [[ -n "$AWQ_DIR" && -e "$awq" ]]; then wflags+=(--awq_model_path_lp "$awq"); fi
}

# every KV combination of the lists: "k v kg vg method residual kscale"
kv_combos=()
for method in "${kv_quant_method_list[@]}"; do
  for k in "${k_bits_list[@]}"; do for v in "${v_bits_list[@]}"; do
    for kg in "${k_group_size_list[@]}"; do for vg in "${v_group_size_list[@]}"; do
      for r in "${kv_residual_len_list[@]}"; do for ks in "${kscale_variants[@]}"; do
        [[ "$method" == KCVT && "$ks" == 1 ]] && continue  # per-channel keys take no k-scale
        kv_combos+=("$k $v $kg $vg $method $r $ks")
      done; done
    done; done
  done; done
done
kv_flags() {  # "k v kg vg method residual kscale": sets the array kvflags
  local k v kg vg method r ks
  read -r k v kg vg method r ks <<<"$1"
  kvflags=(--k_bits "$k" --v_bits "$v" --k_group_size "$kg" --v_group_size "$vg" --kv_quant_method "$method"
           "${rope_flags[@]}")
  [[ "$r" != default ]] && kvflags+=(--kv_residual_len "$r")
  [[ "$ks" == 1 ]] && kvflags+=(--apply_k_scale)
  return 0
}
kv_label() { read -r k v kg vg method r ks <<<"$1"; echo "K${k}g${kg}V${v}g${vg}-$method-r$r$([[ $ks == 1 ]] && echo -kscale)"; }

sweep_init "$RESULTS_DIR"
for model in "${model_list[@]}"; do
  common=(--model "$model" --datasets "$datasets" --n_windows "$n_windows" --seq_len "$seq_len")
  if has_part fp; then sweep_run "$model FP" "${common[@]}"; fi
  if has_part kv; then
    for combo in "${kv_combos[@]}"; do
      kv_flags "$combo"
      sweep_run "$model $(kv_label "$combo")" "${common[@]}" "${kvflags[@]}"
    done
  fi
  for w in "${w_bits_list[@]}"; do for wg in "${w_group_size_list[@]}"; do
    weight_flags "$model" "$w" "$wg"
    if has_part w; then
      sweep_run "$model W${w}g${wg}-$wq_dtype" "${common[@]}" "${wflags[@]}"
    fi
    if has_part full; then
      for combo in "${kv_combos[@]}"; do for p in "${p_bits_list[@]}"; do
        kv_flags "$combo"
        sweep_run "$model W${w}g${wg}-$wq_dtype A$a_bits $(kv_label "$combo") P$p" "${common[@]}" \
          "${wflags[@]}" --a_bits "$a_bits" "${kvflags[@]}" --p_bits "$p"
      done; done
    fi
  done; done
done
sweep_summary
