# Sourced by the AWQ templates: loop over model_name_list x w_bit_list x group_size_list, call
# the template's step function, and print a summary. The step gets (model, w_bit, group_size, tag)
# and returns 0 (done), 3 (skipped: already finished) or anything else (failed; the loop goes on).
# awq_check_values refuses (exit 2, naming the variable) a bad value before anything runs.

# shellcheck source=../lib/sweep.sh
source scripts/lib/sweep.sh  # sweep_check_choice / sweep_check_match

awq_check_values() {  # the variables both templates share; n_calib etc. only where the template has them
  sweep_check_match MODELS . "model names, directories or hub ids" "${model_name_list[@]}"
  sweep_check_match W_BITS "$SWEEP_POS_INT" "positive integers" "${w_bit_list[@]}"
  sweep_check_match GROUP_SIZES "$SWEEP_GROUP_SIZE" "-1 or positive integers" "${group_size_list[@]}"
  sweep_check_choice WQ_DTYPE "int bitmod fp4_e2m1" "$wq_dtype"
  sweep_check_choice DOUBLE_QUANT "0 1" "$double_quant"
  [[ -z "${n_calib+x}" ]] || sweep_check_match N_CALIB "$SWEEP_POS_INT" "a positive integer" "$n_calib"
  [[ -z "${calib_seq_len+x}" ]] || sweep_check_match CALIB_SEQ_LEN "$SWEEP_POS_INT" "a positive integer" "$calib_seq_len"
  [[ -z "${n_grid+x}" ]] || sweep_check_match N_GRID "$SWEEP_POS_INT" "a positive integer" "$n_grid"
  return 0
}

awq_flags() {  # the weight-format flags and the file-name suffix shared by both templates
  awq_suffix=""; [ "$wq_dtype" != int ] && awq_suffix="-$wq_dtype"
  awq_dq_flag=(); [ "$double_quant" = 1 ] && awq_dq_flag=(--use_double_quant) && awq_suffix="$awq_suffix-dq"
  return 0
}

awq_loop() {
  local step=$1 model w_bit group_size tag rc
  local done_list=() skipped_list=() failed_list=()
  awq_flags
  for model in "${model_name_list[@]}"; do
    for w_bit in "${w_bit_list[@]}"; do
      for group_size in "${group_size_list[@]}"; do
        tag="$(basename "$model")-w$w_bit-g$group_size$awq_suffix"
        "$step" "$model" "$w_bit" "$group_size" "$tag"; rc=$?
        case $rc in
          0) done_list+=("$tag") ;;
          3) echo "[skip] $tag: already finished"; skipped_list+=("$tag") ;;
          *) echo "[fail] $tag (exit $rc; see $log_dir)"; failed_list+=("$tag") ;;
        esac
      done
    done
  done
  echo "== summary: ${#done_list[@]} done, ${#skipped_list[@]} skipped, ${#failed_list[@]} failed"
  for tag in "${failed_list[@]}"; do echo "   failed: $tag"; done
  [ ${#failed_list[@]} -eq 0 ]
}
