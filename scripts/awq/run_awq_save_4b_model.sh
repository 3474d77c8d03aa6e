#!/usr/bin/env bash
# Apply saved AWQ caches (from scripts/awq/run_awq.sh) and write each fake-quantized model as a
# Hugging Face checkpoint, loadable by from_pretrained and by main.py --awq_model_path_lp DIR.
# Finished checkpoints are skipped; a missing cache or a failure is logged and the loop goes on;
# a summary is printed at the end.
#   bash scripts/awq/run_awq_save_4b_model.sh
set -u
set -f  # list values are split on spaces, never expanded to file names

model_name_list=(${MODELS:-smollm2-135m})
w_bit_list=(${W_BITS:-4})
group_size_list=(${GROUP_SIZES:-128})
wq_dtype=${WQ_DTYPE:-int}                   # int | bitmod | fp4_e2m1
double_quant=${DOUBLE_QUANT:-0}             # 1: --use_double_quant
cache_dir=${CACHE_DIR:-awq_cache}
save_dir=${SAVE_DIR:-quant_models}
log_dir=${LOG_DIR:-logs/awq}
device=${DEVICE:-cpu}
dtype=${DTYPE:-float32}
python=${PYTHON:-python}

cd "$(dirname "$0")/../.."
source scripts/awq/common.sh
awq_check_values
mkdir -p "$save_dir" "$log_dir"

save() {  # model w_bit group_size tag
  local cache="$cache_dir/$4.pt" out="$save_dir/$4"
  [ -f "$out/config.json" ] && return 3
  if [ ! -f "$cache" ]; then
    echo "[miss] $4: no cache $cache (run scripts/awq/run_awq.sh first)" | tee "$log_dir/$4.save.log"; return 1
  fi
  echo "[run ] $4"
  "$python" -m awq.entry --model "$1" --w_bit "$2" --q_group_size "$3" --wq_dtype "$wq_dtype" "${awq_dq_flag[@]}" \
    --device "$device" --dtype "$dtype" --load_awq "$cache" --dump_fake "$out" >"$log_dir/$4.save.log" 2>&1
}

awq_loop save
