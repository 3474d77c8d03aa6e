#!/usr/bin/env bash
# AWQ search for every (model, bits, group size): one cache file per setting.
# Edit the variables below (or set the environment variables named in them). Finished settings
# (cache file present) are skipped; a failing setting is logged and the loop goes on; a summary
# is printed at the end.
#   bash scripts/awq/run_awq.sh
set -u
set -f  # list values are split on spaces, never expanded to file names

model_name_list=(${MODELS:-smollm2-135m})   # registry names, local directories or hub ids
w_bit_list=(${W_BITS:-4 3})
group_size_list=(${GROUP_SIZES:-128})
wq_dtype=${WQ_DTYPE:-int}                   # int | bitmod | fp4_e2m1
double_quant=${DOUBLE_QUANT:-0}             # 1: --use_double_quant
cache_dir=${CACHE_DIR:-awq_cache}
log_dir=${LOG_DIR:-logs/awq}
device=${DEVICE:-cpu}
dtype=${DTYPE:-float32}
calib_dataset=${CALIB_DATASET:-wiki_sample}
n_calib=${N_CALIB:-128}
calib_seq_len=${CALIB_SEQ_LEN:-512}
n_grid=${N_GRID:-20}                        # grid points of the scale search (clip: half)
python=${PYTHON:-python}

cd "$(dirname "$0")/../.."
source scripts/awq/common.sh
awq_check_values
mkdir -p "$cache_dir" "$log_dir"

search() {  # model w_bit group_size tag
  local cache="$cache_dir/$4.pt"
  [ -f "$cache" ] && return 3
  echo "[run ] $4"
  "$python" -m awq.entry --model "$1" --w_bit "$2" --q_group_size "$3" --wq_dtype "$wq_dtype" "${awq_dq_flag[@]}" \
    --device "$device" --dtype "$dtype" --calib_dataset "$calib_dataset" --n_calib "$n_calib" \
    --calib_seq_len "$calib_seq_len" --n_grid "$n_grid" --run_awq --dump_awq "$cache" >"$log_dir/$4.log" 2>&1
}

awq_loop search
