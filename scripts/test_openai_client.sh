#!/usr/bin/env bash
# Runs tests/python/test_openai_client.py in its own venv (made with pip on
# first use, kept under target/) against the debug `ponder` binary.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=target/py-openai-venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
"$VENV/bin/python" tests/python/test_openai_client.py "${PONDER_BIN:-target/debug/ponder}" "${1:-models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
