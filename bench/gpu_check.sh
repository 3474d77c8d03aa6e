#!/usr/bin/env bash
# The CUDA check (see bench/gpu_check.py): every path on one GPU in FP16 and BF16 against CPU FP32,
# with timings, in at most 10 minutes, with no downloads. Without CUDA it runs its CPU fallback.
#   bash bench/gpu_check.sh [--write] [--skip_7b] [--out DIR]
# On a machine with its own CUDA torch and transformers, nothing is installed: the checkout is put
# on PYTHONPATH. Exit status: 0 when every check passed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 590 "${PYTHON:-python3}" bench/gpu_check.py "$@"
