# Set-up and the two entry points: `make demo` and `make test`. Both create .venv when it is
# missing, reuse it otherwise, and re-install only when pyproject.toml changed (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the local CPU wheel; naming it in the same pip call keeps any dependency
# from pulling another torch build.
TORCH := torch==2.13.0
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test setup lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-base: pyproject.toml | $(PY)
	$(PIP_INSTALL) "$(TORCH)" -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed-base
	$(PIP_INSTALL) "$(TORCH)" -e ".[dev]"
	touch $@

setup: $(VENV)/.installed-base

# The main job on the model available at this stage (stories260K from ../shared/data):
# quantize with 8da4w, save the bundle, reload it, and report quality and size.
demo: $(VENV)/.installed-base
	$(VENV)/bin/edgequant quantize --model stories260k --recipe examples/stories260k-8da4w.yaml \
		--out build/stories260k-8da4w --overwrite
	$(VENV)/bin/edgequant inspect build/stories260k-8da4w

test: $(VENV)/.installed-dev
	$(PY) -m pytest

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(VENV)/.installed-base
	$(PY) benchmarks/kernels.py

clean:
	rm -rf build .pytest_cache
