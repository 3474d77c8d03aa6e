# Sourced by the AWQ templates: loop over model_name_list x w_bit_list x group_size_list, call
# the template's step function, and print a summary. The step gets (model, w_bit, group_size, tag)
# and returns 0 (done), 3 (skipped: already finished) or anything else (failed; the loop goes on).

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
