# Two set-up commands: `make demo` (train the embedded digits recipe) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-tensorflow test-jax demo clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: venv
	KERAS_BACKEND=tensorflow $(PY) -m pytest -q tests
	KERAS_BACKEND=jax $(PY) -m pytest -q tests

test-tensorflow: venv
	KERAS_BACKEND=tensorflow $(PY) -m pytest -q tests

test-jax: venv
	KERAS_BACKEND=jax $(PY) -m pytest -q tests

demo: venv
	KERAS_BACKEND=jax $(VENV)/bin/keras-minsnr train digits --output-dir runs/demo
	@echo "Demo run written to runs/demo/ (samples.png, metrics.csv, model.keras)"

clean:
	rm -rf $(VENV) runs
