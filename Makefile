# Set-up commands: `make demo` (train the embedded digits recipe) and `make test`.
# `make venv` installs the pinned versions the suite passed with (constraints.txt);
# `make test-latest` runs the suites on the newest versions setup.cfg allows.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LATEST := .venv-latest

.PHONY: venv test test-tensorflow test-jax demo notebooks test-latest constraints clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Both backends' suites at once: much of a test's time is single-threaded graph tracing,
# so two processes use two cores better than one. Each report prints when its suite ends.
test: venv
	@echo "Running the TensorFlow and JAX test suites side by side (reports follow as each ends)."
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-tensorflow test-jax

test-tensorflow: venv
	KERAS_BACKEND=tensorflow $(VENV)/bin/python -m pytest -q tests

test-jax: venv
	KERAS_BACKEND=jax $(VENV)/bin/python -m pytest -q tests

demo: venv
	KERAS_BACKEND=jax $(VENV)/bin/keras-minsnr train digits --output-dir runs/demo
	@echo "Demo run written to runs/demo/ (samples.png, metrics.csv, model.keras)"

# The guides' notebooks, executed, with their outputs (plots, sample grids); one at a time.
notebooks: venv
	$(PY) -m pip install --quiet -c constraints.txt -e ".[guides]"
	$(PY) guides/make_notebooks.py --execute

# The newest releases within setup.cfg's ranges, in a separate venv (no constraints).
# If it passes, `make constraints` (run with VENV=.venv-latest) records them.
test-latest:
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST)/bin/python -m pip freeze | grep -i -E "^(keras|tensorflow|jax|numpy)[-=]"
	@$(MAKE) --no-print-directory -j2 --output-sync=target VENV=$(LATEST) STAMP= \
		test-tensorflow test-jax

# Rewrite constraints.txt from a venv's installed versions (default: .venv).
constraints:
	@{ sed -n '/^#/p;/^[^#]/q' constraints.txt; \
	   $(VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i "^keras.minsnr"; } \
	   > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) $(LATEST) runs
