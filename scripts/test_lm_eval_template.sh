#!/usr/bin/env bash
# lm-eval sweep: the tasks below on FP and on the full W/A/KV settings (with and without k-scale)
# of scripts/test_ppl_template.sh (see its header for the quantization variables). Scores go into
# the same result files as a perplexity sweep with the same RESULTS_DIR and N_WINDOWS.
# Offline tasks: wkvaq_wiki_sample_mc, wkvaq_wiki_sample_ppl (lm-evaluation-harness/); hub tasks
# (arc_easy, hellaswag, piqa, ...) need their datasets.
# Values are checked before anything runs (a bad one is refused naming the variable, exit 2; the
# quantization variables by scripts/test_ppl_template.sh); no value is expanded to file names (set -f).
set -euo pipefail
set -f
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/sweep.sh
source "$root/scripts/lib/sweep.sh"
tasks="${TASKS:-wkvaq_wiki_sample_mc}"
limit="${LIMIT-50}"                      # documents per task; empty = all
num_fewshot="${NUM_FEWSHOT:-}"           # empty = the task's default
batch_size="${BATCH_SIZE:-4}"
apply_chat_template="${APPLY_CHAT_TEMPLATE:-off}"  # on | off
sweep_check_match TASKS '^[^[:space:]]+$' "comma-separated task names, no spaces" "$tasks"
[[ -z "$limit" ]] || sweep_check_match LIMIT '^([1-9][0-9]*|0?\.[0-9]*[1-9][0-9]*)$' \
  "empty (all), documents per task (>= 1) or a fraction (< 1)" "$limit"
[[ -z "$num_fewshot" ]] || sweep_check_match NUM_FEWSHOT '^[0-9]+$' "empty (the task's default) or an integer >= 0" \
  "$num_fewshot"
sweep_check_match BATCH_SIZE "$SWEEP_POS_INT" "a positive integer" "$batch_size"
sweep_check_choice APPLY_CHAT_TEMPLATE "on off" "$apply_chat_template"
export MODEL_LIST="${MODEL_LIST:-smollm2-135m}"
export SWEEP_PARTS="${SWEEP_PARTS:-fp full}"
export APPLY_K_SCALE="${APPLY_K_SCALE:-both}"
export DATASETS=""                       # tasks only (perplexity: scripts/test_ppl_template.sh)
export N_WINDOWS="${N_WINDOWS:-2}"       # only part of the result file's name here
export SEQ_LEN="${SEQ_LEN:-2048}"        # lm-eval's max_length
export RESULTS_DIR="${RESULTS_DIR:-results/sweep_ppl}"
lm_args="--tasks $tasks --batch_size $batch_size"
[[ -n "$limit" ]] && lm_args+=" --limit $limit"
[[ -n "$num_fewshot" ]] && lm_args+=" --num_fewshot $num_fewshot"
[[ "$apply_chat_template" == on ]] && lm_args+=" --apply_chat_template"
export EXTRA_ARGS="$lm_args ${EXTRA_ARGS:-}"
exec bash "$root/scripts/test_ppl_template.sh"
