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

# Both backends' suites at once: much of a test's time is single-threaded graph tracing,
# so two processes use two cores better than one. Each report prints when its suite ends.
test: venv
	@echo "Running the TensorFlow and JAX test suites side by side (reports follow as each ends)."
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-tensorflow test-jax

test-tensorflow: venv
	KERAS_BACKEND=tensorflow $(PY) -m pytest -q tests

test-jax: venv
	KERAS_BACKEND=jax $(PY) -m pytest -q tests

demo: venv
	KERAS_BACKEND=jax $(VENV)/bin/keras-minsnr train digits --output-dir runs/demo
	@echo "Demo run written to runs/demo/ (samples.png, metrics.csv, model.keras)"

clean:
	rm -rf $(VENV) runs
