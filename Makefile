# The two commands of the README: `make up` and `make test`. Everything builds
# once, in the dev profile (dependencies and the engine optimised, see Cargo.toml).
CARGO ?= cargo
SHARDSERVE_CACHE ?= $(HOME)/.cache/shardserve
export SHARDSERVE_CACHE
BIN := target/debug/shardserve
DEMO_MODEL := $(SHARDSERVE_CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf
THREADS ?= 2

# The official OpenAI Python client, pinned, in a virtualenv for the e2e test.
VENV := .venv
OPENAI_VERSION := 3.57.0
VENV_STAMP := $(VENV)/.openai-$(OPENAI_VERSION)
MANIFEST ?= examples/smollm2.yaml

.PHONY: up test build build-tests fetch-demo venv bench lint

## Build, then run the demo manifest locally (workers + router) until Ctrl-C.
up: build
	$(BIN) up $(MANIFEST)

## Fetch what the tests need, then run every test of the workspace.
test: build-tests fetch-demo venv
	SHARDSERVE_E2E_PYTHON=$(abspath $(VENV)/bin/python) $(CARGO) test --workspace --all-targets

## A virtualenv with the pinned `openai` package (quick when already there).
venv: $(VENV_STAMP)

$(VENV_STAMP):
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check openai==$(OPENAI_VERSION)
	touch $@

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
