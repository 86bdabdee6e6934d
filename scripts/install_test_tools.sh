#!/usr/bin/env bash
# Installs what the tests run beside ponder, once per machine:
#   - Debian's `prometheus` (prometheus, promtool): tests/deploy.rs checks
#     deploy/prometheus.yml with promtool and scrapes a live ponder with it;
#   - Debian's `docker-compose`: it checks docker/compose.yaml (no Docker
#     engine needed for `config`);
#   - a venv with scripts/test-tools.txt (llama.cpp's server for
#     tests/llama_cpp.rs, kubernetes-validate for the manifests) under
#     $PONDER_TOOLS (default ~/.cache/ponder/tools), outside the repository
#     so that a machine that keeps its home keeps the llama.cpp build.
# Prints nothing when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="${PONDER_TOOLS:-$HOME/.cache/ponder/tools}"
PYTHON="${PYTHON:-python3}"

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
  echo "install_test_tools: pip install into $TOOLS/venv (llama-cpp-python builds llama.cpp: minutes)" >&2
  start=$(date +%s)
  rm -rf "$TOOLS/venv"
  mkdir -p "$TOOLS"
  "$PYTHON" -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/python" -m pip install --quiet --disable-pip-version-check -r scripts/test-tools.txt >&2
  printf '%s' "$want" > "$stamp"
  echo "install_test_tools: done in $(( $(date +%s) - start )) s" >&2
fi
