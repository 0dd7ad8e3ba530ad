# One command to run the daemon, one to test it. Both set up .venv first.
#
#   make run     # set up, then `sbrender run` with config/sbrender.yaml
#   make test    # set up, then the whole test suite and examples/django's (CPU only; a fresh
#                # clone's .ci/run on 2 cores, 1072 tests: about 13 min with setup (pytest 9); 19 beside
#                # two busy processes; redis-server installed by it)
#
# TORCH picks the PyTorch build. torch==2.13.0 from PyPI is the CUDA build on
# Linux x86-64 (what a GPU box wants); machines with a local CPU wheel of it
# (this project's CI) take that instead, in seconds.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sbrender-installed

.PHONY: setup run test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[render,test]"
	touch $@

run: $(STAMP)
	$(BIN)/sbrender run $(ARGS)

# Two pytest-xdist workers; --dist loadgroup keeps each xdist_group on one worker.
# PYTEST_ARGS come last: PYTEST_ARGS="-n 0" runs in one process.
PYTEST_WORKERS ?= 2

test: $(STAMP)
	scripts/ensure-redis-server
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --durations=25 $(PYTEST_ARGS)
	$(BIN)/python examples/django/manage.py test --noinput --verbosity 0

clean:
	rm -rf $(VENV) state .pytest_cache
