# agentbox: the targets a user types. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
CLUSTER     ?= kwok
CLUSTER_NAME ?= agentbox
export AGENTBOX_CLUSTER_KIND := $(CLUSTER)
export AGENTBOX_CLUSTER_NAME := $(CLUSTER_NAME)
# The real node beside the kwok nodes is on unless AGENTBOX_REAL_NODE=0 (hack/cluster.sh has the default).
# kind brings nodes of its own and no real node: nothing of the real node's toolchain or images then, and
# the `realnode` tests skip.
ifeq ($(CLUSTER),kind)
export AGENTBOX_REAL_NODE := 0
endif
REAL_NODE   := $(if $(filter 0,$(AGENTBOX_REAL_NODE)),0,1)
PYTEST_ARGS ?=

.PHONY: help
help: ## list the targets
	@awk 'BEGIN{FS=":.*## "} /^[a-zA-Z0-9_-]+:.*## /{printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# -P keeps the working directory off sys.path: here `operator/` would shadow the standard library's
# `operator` for any interpreter that has not imported it yet (the venv's site hook imports it first).
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -P -m venv $(VENV)
	@$(PY) -P -m pip install -q --upgrade pip
	@$(PY) -P -m pip install -q -e '.[test]'
	@touch $@

.PHONY: venv
venv: $(VENV)/.installed ## create .venv with agentbox and its test tools

.PHONY: binaries
binaries: ## build the local cluster's binaries into ~/.cache/agentbox (once; slow the first time)
	@hack/build-binaries.sh

.PHONY: cluster
cluster: venv binaries ## create or reuse the local cluster (CLUSTER=kwok|kind) and print its kubeconfig
	@hack/cluster.sh up

.PHONY: images
images: ## build the control-plane, sandbox and agent images with buildah (no Docker, no registry) for the real node
	@hack/images.sh

# What the real node's pods run, for the targets that start sessions; nothing with AGENTBOX_REAL_NODE=0.
.PHONY: node-images
node-images:
ifeq ($(REAL_NODE),1)
	@hack/images.sh
endif

.PHONY: cluster-down
cluster-down: ## delete the local cluster
	@hack/cluster.sh down

.PHONY: crds
crds: venv ## regenerate the CRD YAML in crds/ from the Pydantic models
	@$(PY) -m agentbox.crds.generate

.PHONY: lint
lint: venv ## ruff and the import-layering contracts
	@$(VENV)/bin/ruff check .
	@VENV=$(VENV) hack/lint-imports.sh

.PHONY: unit
unit: venv ## the fast layer alone: no cluster, no database
	@$(VENV)/bin/pytest -m "not cluster and not postgres and not e2e and not agents" $(PYTEST_ARGS)

.PHONY: test
test: lint binaries agent-packages node-images ## everything: lint, import contracts, unit, integration on the real cluster and database, e2e, the real agents
	@$(VENV)/bin/pytest $(PYTEST_ARGS)

.PHONY: agent-packages
agent-packages: ## install the real ACP agents (sandbox/images/agents.json) from npm into ~/.cache/agentbox/agents
	@hack/agents.sh >/dev/null

.PHONY: agents
agents: venv agent-packages ## the real ACP agents' tests
	@$(VENV)/bin/pytest -m agents tests/sandbox/test_real_agents.py $(PYTEST_ARGS)

.PHONY: e2e
e2e: venv binaries node-images ## the end-to-end journeys and the chart's tests (CLUSTER=kind: images built and loaded, needs Docker)
ifeq ($(CLUSTER),kind)
	@if command -v docker >/dev/null 2>&1 && command -v kind >/dev/null 2>&1 && docker info >/dev/null 2>&1; then \
	  docker build -q -t ghcr.io/agentbox-dev/agentbox:0.1.0 . && \
	  docker build -q -f sandbox/images/Dockerfile -t ghcr.io/agentbox-dev/sandbox:0.1.0 . && \
	  AGENTBOX_CLUSTER_NAME=agentbox-test hack/cluster.sh up >/dev/null && \
	  kind load docker-image --name agentbox-test ghcr.io/agentbox-dev/agentbox:0.1.0 ghcr.io/agentbox-dev/sandbox:0.1.0; \
	else echo "e2e: CLUSTER=kind needs Docker and kind; the tests will say they are skipped"; fi
endif
	@$(VENV)/bin/pytest -m e2e $(PYTEST_ARGS)

.PHONY: bench
bench: venv binaries ## the benchmarks on the cluster CLUSTER_NAME (agentbox, as make dev); JSON in bench/results/
	@$(PY) -m bench $(BENCH_ARGS)

.PHONY: dev
dev: venv binaries node-images ## bring the whole system up locally (cluster, database, operator, API)
	@hack/dev.sh up

.PHONY: dev-down
dev-down: ## stop and remove everything `make dev` started
	@hack/dev.sh down
