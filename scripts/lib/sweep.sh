# Shared by the sweep templates (source it; needs bash >= 4).
#   sweep_init RESULTS_DIR         start a sweep (log directory, outcome list)
#   sweep_run LABEL FLAGS...       run `main.py FLAGS...` unless its result is finished;
#                                  a failure is logged and the sweep goes on
#   sweep_summary                  print every outcome and the report table; exit status 1 if any failed
#   sweep_check_choice VAR "a b c" VALUE...    refuse (exit 2) unless there is a VALUE and each is a, b or c
#   sweep_check_match VAR REGEX "what" VALUE... refuse (exit 2) unless there is a VALUE and each matches REGEX
# Environment: PYTHON (interpreter), EXTRA_ARGS (appended to every main.py call; split on spaces, never
# globbed). The templates run with `set -f`: a list value such as '*' is never expanded to file names.

SWEEP_POS_INT='^[1-9][0-9]*$'          # positive integers
SWEEP_GROUP_SIZE='^(-1|[1-9][0-9]*)$'  # -1 (the whole row / axis) or positive integers

_sweep_refuse_value() {  # VAR VALUE ALLOWED
  local hint=""
  [[ "$2" == *,* ]] && hint=" (lists are space-separated, not comma-separated)"
  echo "$1: '$2' is not allowed$hint; allowed: $3" >&2
  exit 2
}

sweep_check_choice() {
  local var="$1" allowed="$2" value word ok; shift 2
  [[ $# -gt 0 ]] || { echo "$var is empty; allowed: ${allowed// /, }" >&2; exit 2; }
  for value in "$@"; do
    ok=0
    for word in $allowed; do [[ "$value" == "$word" ]] && ok=1; done
    [[ $ok == 1 ]] || _sweep_refuse_value "$var" "$value" "${allowed// /, }"
  done
}

sweep_check_match() {
  local var="$1" regex="$2" what="$3" value; shift 3
  [[ $# -gt 0 ]] || { echo "$var is empty; allowed: $what" >&2; exit 2; }
  for value in "$@"; do
    [[ "$value" =~ $regex ]] || _sweep_refuse_value "$var" "$value" "$what"
  done
}

sweep_init() {
  SWEEP_RESULTS_DIR="$1"
  SWEEP_LOG_DIR="$SWEEP_RESULTS_DIR/logs"
  mkdir -p "$SWEEP_LOG_DIR"
  SWEEP_PY="${PYTHON:-python3}"
  SWEEP_OUTCOMES=()
  SWEEP_FAILED=0
}

_sweep_log_name() {  # a file name for a label
  printf '%s' "$1" | tr -c 'A-Za-z0-9._=-' '_'
}

sweep_run() {
  local label="$1"; shift
  local args=("$@" --results_dir "$SWEEP_RESULTS_DIR")
  local extra=()
  read -r -a extra <<<"${EXTRA_ARGS:-}"  # split on spaces, no file-name expansion
  args+=("${extra[@]}")
  local log="$SWEEP_LOG_DIR/$(_sweep_log_name "$label").log"
  local status
  if ! status="$("$SWEEP_PY" main.py "${args[@]}" --print_result_path 2>"$log")"; then
    echo "[sweep] FAILED  $label (refused: $(tail -n 1 "$log"); log: $log)"
    SWEEP_OUTCOMES+=("failed|$label|$log"); SWEEP_FAILED=$((SWEEP_FAILED + 1)); return 0
  fi
  local path="${status#* }"
  if [[ "$status" == done\ * ]]; then
    echo "[sweep] skipped $label (finished: $path)"
    SWEEP_OUTCOMES+=("skipped|$label|$path"); return 0
  fi
  echo "[sweep] running $label"
  if "$SWEEP_PY" main.py "${args[@]}" --no_progress >"$log" 2>&1; then
    echo "[sweep] done    $label -> $path"
    SWEEP_OUTCOMES+=("done|$label|$path")
  else
    echo "[sweep] FAILED  $label (exit $?; log: $log)"
    SWEEP_OUTCOMES+=("failed|$label|$log"); SWEEP_FAILED=$((SWEEP_FAILED + 1))
  fi
  return 0
}

sweep_summary() {
  local done=0 skipped=0 entry
  echo
  echo "=== sweep summary ($SWEEP_RESULTS_DIR)"
  echo "| outcome | setting | result or log |"
  echo "|---|---|---|"
  for entry in "${SWEEP_OUTCOMES[@]}"; do
    IFS='|' read -r outcome label where <<<"$entry"
    [[ "$outcome" == done ]] && done=$((done + 1))
    [[ "$outcome" == skipped ]] && skipped=$((skipped + 1))
    echo "| $outcome | $label | $where |"
  done
  echo "done: $done, skipped (already finished): $skipped, failed: $SWEEP_FAILED"
  echo
  "$SWEEP_PY" -m wkvaq_quant.report "$SWEEP_RESULTS_DIR" || true
  [[ "$SWEEP_FAILED" -eq 0 ]]
}
