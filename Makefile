# Every target creates .venv and installs what it needs first; finished steps are skipped.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
ARGS ?=
TOOLS := $(CURDIR)/.tools
BUF := $(TOOLS)/buf
BUF_VERSION := v1.75.0
GRPCURL_VERSION := v1.9.4
GHZ_VERSION := v0.93.0
KUSTOMIZE := $(TOOLS)/kustomize
KUSTOMIZE_VERSION := v5.8.1
DEPLOY_VENV := $(TOOLS)/deploy-venv
PROTOS := $(wildcard protos/cai/v1/*.proto)
PROTOC = $(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1) $(PROTOS)

.PHONY: help install model up test lint format protos protos-check tools kafka bench deploy-check controlplane kube-up image image-if-possible clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(INSTALLED)  ## create .venv and install the project with its dev tools

model: install  ## prepare the default model (SmolLM2-135M-Instruct) in $CAI_HOME
	$(BIN)/cai models setup

up: model  ## run the main job: `cai up` on the default model (extra flags: make up ARGS="--limit 8")
	$(BIN)/cai up $(ARGS)

lint: install protos-check  ## buf lint, stubs up to date, ruff lint and format check, mypy, import contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

$(BUF):
	GOBIN=$(TOOLS) go install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)

$(TOOLS)/grpcurl:
	GOBIN=$(TOOLS) go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

$(TOOLS)/ghz:
	GOBIN=$(TOOLS) go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

tools: $(BUF) $(TOOLS)/grpcurl $(TOOLS)/ghz  ## install buf, grpcurl and ghz (Go) into .tools/

kafka: install  ## fetch Apache Kafka's jars with Maven into $CAI_HOME/kafka (needs mvn; the broker needs Java 17)
	$(BIN)/cai kafka fetch

protos: install  ## regenerate the Python stubs in cai/v1 from protos/
	$(call PROTOC,.)

protos-check: install $(BUF)  ## buf lint the protos; fail if cai/v1 differs from what they generate
	cd protos && $(BUF) lint
	tmp=$$(mktemp -d) && $(call PROTOC,$$tmp) && \
	  diff -r -x __init__.py -x __pycache__ $$tmp/cai/v1 cai/v1 || \
	  { echo "cai/v1 is stale: run 'make protos' and commit the result"; exit 1; }

format: install  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint deploy-check model tools kafka controlplane image-if-possible  ## lint, then run every test (unit, services, integration on the real model, tests/k8s on a real control plane)
	$(BIN)/pytest

$(VENV)/.bench-installed: $(INSTALLED)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	$(BIN)/python -m pip install --quiet --no-deps "langchain-huggingface>=1.2.3,<2"
	touch $@

bench: model tools kafka $(VENV)/.bench-installed  ## run the benchmarks; prints tables, writes benchmarks/results/*.json
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.online

$(KUSTOMIZE):
	GOBIN=$(TOOLS) go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)

# pyproject.toml's `deploy` extra, in a virtualenv of its own: checkov pins older packaging,
# networkx and python-dateutil than the project's dependencies want.
$(DEPLOY_VENV)/.installed: pyproject.toml $(INSTALLED)
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(BIN)/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['deploy']))" > $(DEPLOY_VENV)/requirements.txt
	$(DEPLOY_VENV)/bin/python -m pip install --quiet -r $(DEPLOY_VENV)/requirements.txt
	touch $@

deploy-check: install $(KUSTOMIZE) $(DEPLOY_VENV)/.installed  ## render deploy/k8s; kubernetes-validate, CRD schemas, checkov, hadolint, invariants
	$(BIN)/python deploy/check.py --kustomize $(KUSTOMIZE) --tools $(DEPLOY_VENV)/bin
	$(BIN)/pytest -q tests/deploy --ignore=tests/deploy/test_image.py

controlplane:  ## build etcd, kube-apiserver, controller manager, scheduler, kubectl and kwok (Go, once, cached) and fetch the CRDs tests/k8s needs
	bash deploy/controlplane/build.sh
	bash deploy/controlplane/crds.sh

OVERLAY ?= local
kube-up: install controlplane  ## a Kubernetes control plane on loopback with simulated CPU and GPU nodes, deploy/k8s/overlays/$(OVERLAY) applied; Ctrl-C stops it
	$(BIN)/python deploy/controlplane/controlplane.py up --apply deploy/k8s/overlays/$(OVERLAY)

image: install  ## build the CPU image with the default model (docker build; a private dockerd and a debootstrap base where needed)
	$(BIN)/python deploy/image/image.py build

# For `make test`: build the image if it is missing and a Docker engine can run here.
image-if-possible: install
	$(BIN)/python deploy/image/image.py build --if-missing --if-engine

clean:  ## remove .venv and caches (the prepared model in $CAI_HOME stays)
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
