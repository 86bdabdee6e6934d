#!/usr/bin/env bash
# Installs what the tests run beside ponder, once per machine:
#   - Debian's `prometheus` (prometheus, promtool): tests/deploy.rs checks
#     deploy/prometheus.yml with promtool and scrapes a live ponder with it;
#   - Debian's `docker-compose`: it checks docker/compose.yaml (no Docker
#     engine needed for `config`);
#   - a venv with scripts/test-tools.txt (kubernetes-validate for the
#     manifests; cmake and ninja);
#   - llama.cpp's `llama-server` for tests/llama_cpp.rs, built from the
#     llama.cpp sources inside PyPI's llama-cpp-python sdist (about 8
#     minutes cold on 2 vCPU).
# Everything but the Debian packages goes under $PONDER_TOOLS (default
# ~/.cache/ponder/tools), outside the repository, so a machine that keeps
# its home keeps the build. Prints nothing when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="${PONDER_TOOLS:-$HOME/.cache/ponder/tools}"
PYTHON="${PYTHON:-python3}"

LLAMA_CPP_PYTHON=0.3.36
LLAMA_SDIST_URL="https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz"
LLAMA_SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

missing=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "install_test_tools: apt-get install ${missing[*]}" >&2
  $SUDO apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# The venv is rebuilt only when the pinned requirements change.
want="$(grep -v '^#' scripts/test-tools.txt | sed '/^$/d')"
stamp="$TOOLS/venv/.ponder-requirements"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "install_test_tools: pip install into $TOOLS/venv" >&2
  rm -rf "$TOOLS/venv"
  mkdir -p "$TOOLS"
  "$PYTHON" -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/python" -m pip install --quiet --disable-pip-version-check -r scripts/test-tools.txt >&2
  printf '%s' "$want" > "$stamp"
fi

# llama-server, linked into the venv's bin/ where the tests look.
# Built for x86-64-v3 (AVX2, FMA, F16C) rather than -march=native: on a
# Xeon with AMX, ggml's native build takes its AMX matmul path, which
# segfaults in the first decode where the kernel has not granted AMX tile
# state; and CI machines differ from one run to the next. The build flavour
# is part of the cache key so an older native build is not reused.
case "$(uname -m)" in
  x86_64) flavour=x86-64-v3; cpu_flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" ;;
  *) flavour=native; cpu_flags="" ;;
esac
server="$TOOLS/llama.cpp-$LLAMA_CPP_PYTHON-$flavour/bin/llama-server"
if [ ! -x "$server" ]; then
  echo "install_test_tools: building llama.cpp's llama-server (from llama-cpp-python $LLAMA_CPP_PYTHON; minutes)" >&2
  start=$(date +%s)
  work="$TOOLS/llama.cpp-$LLAMA_CPP_PYTHON.build"
  rm -rf "$work"
  mkdir -p "$work"
  "$TOOLS/venv/bin/python" - "$LLAMA_SDIST_URL" "$LLAMA_SDIST_SHA256" "$work/sdist.tar.gz" <<'PY'
import hashlib, sys, urllib.request
url, sha, out = sys.argv[1:]
data = urllib.request.urlopen(url, timeout=300).read()
got = hashlib.sha256(data).hexdigest()
if got != sha:
    sys.exit(f"{url}: sha256 {got}, expected {sha}")
open(out, "wb").write(data)
PY
  tar -xzf "$work/sdist.tar.gz" -C "$work"
  src="$work/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
  "$TOOLS/venv/bin/cmake" -S "$src" -B "$work/build" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$TOOLS/venv/bin/ninja" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF $cpu_flags >&2
  "$TOOLS/venv/bin/cmake" --build "$work/build" --target llama-server -j "$(nproc)" >&2
  mkdir -p "$(dirname "$server")"
  cp "$work/build/bin/llama-server" "$server"
  rm -rf "$work"
  echo "install_test_tools: llama-server built in $(( $(date +%s) - start )) s" >&2
fi
ln -sf "$server" "$TOOLS/venv/bin/llama-server"
