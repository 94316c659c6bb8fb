# `make test` and `make demo` set up .venv on first use (the mmcv source
# build takes 20-30 minutes on two cores; pip caches the wheel, so a later
# set-up on the same machine takes a minute) and skip what is installed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
CONSTRAINTS := -c requirements/constraints.txt
STAMPS := $(VENV)/.stamps
MAX_JOBS ?= 2
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean-venv

setup: $(STAMPS)/plugin

$(STAMPS)/venv:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q pip==26.3
	mkdir -p $(STAMPS) && touch $@

$(STAMPS)/build: $(STAMPS)/venv requirements/build.txt requirements/constraints.txt
	$(PIP) install -q $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q $(CONSTRAINTS) -r requirements/build.txt
	touch $@

# mmcv has only source archives on PyPI; its ops are compiled against the
# torch installed above, hence --no-build-isolation.
$(STAMPS)/mmcv: $(STAMPS)/build requirements/mmcv.txt
	MMCV_WITH_OPS=1 MAX_JOBS=$(MAX_JOBS) $(PIP) install -q \
		--no-build-isolation $(CONSTRAINTS) -r requirements/mmcv.txt
	touch $@

$(STAMPS)/runtime: $(STAMPS)/mmcv requirements/runtime.txt
	$(PIP) install -q $(CONSTRAINTS) -r requirements/runtime.txt
	touch $@

$(STAMPS)/plugin: $(STAMPS)/runtime setup.cfg pyproject.toml
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py

bench: setup
	$(PY) tools/benchmark_loss.py

clean-venv:
	rm -rf $(VENV)
