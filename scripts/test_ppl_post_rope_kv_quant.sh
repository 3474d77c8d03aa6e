#!/usr/bin/env bash
# Post-RoPE KV-cache sweep: keys quantized after RoPE, K/V bits x residual length x k-scale, on top
# of the FP baseline. A thin front of scripts/test_ppl_template.sh (see its header for every
# variable); edit the defaults here or override them from the environment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MODEL_LIST="${MODEL_LIST:-smollm2-135m}"
export K_BITS_LIST="${K_BITS_LIST:-4 2}"
export V_BITS_LIST="${V_BITS_LIST:-4 2}"
export K_GROUP_SIZE_LIST="${K_GROUP_SIZE_LIST:-64}"
export V_GROUP_SIZE_LIST="${V_GROUP_SIZE_LIST:-64}"
export KV_QUANT_METHOD_LIST="${KV_QUANT_METHOD_LIST:-KTVT}"
export KV_RESIDUAL_LEN_LIST="${KV_RESIDUAL_LEN_LIST:-0 128}"
export APPLY_K_SCALE="${APPLY_K_SCALE:-on}"
export K_QUANT_POST_ROPE=on
export SWEEP_PARTS="${SWEEP_PARTS:-fp kv}"
export DATASETS="${DATASETS:-wiki_sample}"
export N_WINDOWS="${N_WINDOWS:-2}"
export RESULTS_DIR="${RESULTS_DIR:-results/sweep_post_rope}"
exec bash "$root/scripts/test_ppl_template.sh"
