#!/usr/bin/env bash
# Installs what `cargo build --features cuda` needs, on a machine with no
# GPU and no CUDA toolkit: the PyPI wheels in scripts/cuda-wheels.txt in a
# venv, laid out as one CUDA root ($PONDER_CUDA, default
# ~/.cache/ponder/cuda-13.0: bin/nvcc, include/, lib64/ with the unversioned
# names the linker asks for, nvvm/), plus a link-time stub of the driver
# library libcuda.so (the driver, not the toolkit, provides the real one on
# the GPU machine; the stub only satisfies the linker, as the toolkit's own
# lib64/stubs/libcuda.so does). Prints the environment to build with:
#   eval "$(scripts/install_cuda.sh)"; cargo build --release --features cuda
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${PONDER_CUDA:-$HOME/.cache/ponder/cuda-13.0}"
PYTHON="${PYTHON:-python3}"
want="$(grep -v '^#' scripts/cuda-wheels.txt | sed '/^$/d')"
stamp="$ROOT/.ponder-wheels"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "install_cuda: pip install the CUDA wheels into $ROOT/venv" >&2
  rm -rf "$ROOT"
  mkdir -p "$ROOT"
  "$PYTHON" -m venv "$ROOT/venv"
  "$ROOT/venv/bin/python" -m pip install --quiet --disable-pip-version-check -r scripts/cuda-wheels.txt >&2
  cu="$("$ROOT/venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
  ln -s "$cu/bin" "$ROOT/bin"
  ln -s "$cu/include" "$ROOT/include"
  ln -s "$cu/nvvm" "$ROOT/nvvm"
  mkdir -p "$ROOT/lib64/stubs"
  for lib in "$cu"/lib/*.so.*; do
    base="$(basename "$lib")"
    ln -sf "$lib" "$ROOT/lib64/$base"
    ln -sf "$lib" "$ROOT/lib64/${base%%.so.*}.so"
  done
  # Every driver function candle's cudarc can call, as a stub returning
  # CUDA_ERROR_STUB_LIBRARY (34), named libcuda.so.1 like the real one.
  sys="$(cargo metadata --format-version 1 --features cuda 2>/dev/null \
    | "$ROOT/venv/bin/python" -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')"
  "$ROOT/venv/bin/python" - "$(dirname "$sys")/src/driver/sys/mod.rs" "$ROOT/lib64/stubs/cuda_stub.c" <<'PY'
import re, sys
names = sorted(set(re.findall(r"^\s*fn (cu\w+)\(", open(sys.argv[1]).read(), re.M)))
with open(sys.argv[2], "w") as f:
    f.write("/* Link-time stub of the CUDA driver API (generated). */\n")
    for n in names:
        f.write(f"int {n}(void) {{ return 34; }}\n")
print(f"install_cuda: stub of {len(names)} driver functions", file=sys.stderr)
PY
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib64/stubs/libcuda.so" "$ROOT/lib64/stubs/cuda_stub.c"
  printf '%s' "$want" > "$stamp"
fi
# What cudarc and candle-kernels read: the CUDA root, the version (cudarc
# would otherwise parse `nvcc --version`), and the GPU generation to compile
# kernels for when no GPU can be asked (90: Hopper, the H100/H200).
cat <<ENV
export CUDA_ROOT="$ROOT"
export PATH="$ROOT/bin:\$PATH"
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$ROOT/lib64:$ROOT/lib64/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$ROOT/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
ENV
