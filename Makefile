# The two set-up commands of the README: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this kind of machine; a CUDA build works too.
TORCH ?= torch==2.13.0

.PHONY: demo test install dev bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $@

install: $(VENV)/.installed

# TD3 without target averaging, plain vs LayerNorm critic, under the divergence callbacks (README: The demo).
demo: install
	$(VENV)/bin/lit-qlearn demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) lightning_logs
