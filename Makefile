# Two entry points on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs. On the project's CI/dev machines the CPU
# wheel of torch lies on disk and is pinned first; elsewhere pip resolves torch>=2.4 itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_PIN)" || $(BIN)/pip install -q "torch>=2.4"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# The main job: an image from the embedded default model (src/fastsana/assets/sana-shapes).
demo: $(VENV)/.installed
	$(BIN)/fastsana generate "a red circle to the left of a blue square" -o demo.png --seed 0

test: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(BIN)/ruff check src tests bench
	HF_HUB_OFFLINE=1 $(BIN)/ruff format --check src tests bench
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench

format: $(VENV)/.installed-test
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
