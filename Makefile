# The two commands of the README: `make up` and `make test`. Everything builds
# once, in the dev profile (dependencies and the engine optimised, see Cargo.toml).
CARGO ?= cargo
SHARDSERVE_CACHE ?= $(HOME)/.cache/shardserve
export SHARDSERVE_CACHE
BIN := target/debug/shardserve
DEMO_MODEL := $(SHARDSERVE_CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf
THREADS ?= 2

.PHONY: up test build build-tests fetch-demo bench lint

## Build, fetch the demo model if missing, and chat with it in the terminal.
up: build fetch-demo
	$(BIN) chat --model $(DEMO_MODEL) --threads $(THREADS)

## Fetch what the tests need, then run every test of the workspace.
test: build-tests fetch-demo
	$(CARGO) test --workspace --all-targets

build:
	$(CARGO) build -p shardserve

build-tests:
	$(CARGO) build --workspace --all-targets

fetch-demo:
	@test -x $(BIN) || $(CARGO) build -p shardserve
	$(BIN) model fetch-demo

## Prefill and decode speed on the demo model.
bench: build fetch-demo
	$(BIN) bench --model $(DEMO_MODEL) --threads $(THREADS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
