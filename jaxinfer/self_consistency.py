"""Self-consistency: sample several answers to one prompt, extract each one's answer, majority-vote,
and stop as soon as the vote is decided.

    SamplingParams(self_consistency=SelfConsistency(answer="number", max_samples=8))
      -> the engine draws up to max_samples samples sharing the prompt's KV pages
      -> OutputProcessor: each finished sample's answer (`extract`), its vote (1, or its confidence
         exp(mean token logprob) with weighted=True); after every step `decide`: once no outcome
         of the samples still running can change the winner, they are aborted (pages freed) and
         the request finishes
      -> RequestOutput.self_consistency: SelfConsistencyResult(answer, votes, samples, tokens)

The early stop never changes the winner: it stops only when the leader's votes exceed the
runner-up's by more than every remaining sample could add (each adds at most 1, weighted or not),
so counting them all would give the same winner (tested on random vote sequences).
"""

from __future__ import annotations

import dataclasses
import math
import re

from jaxinfer.errors import InvalidRequestError

# Built-in answer extractors; any other string is a regex (its first group, else the whole match;
# the last match in the text).
EXTRACTORS = {
    "number": r"-?\d[\d,]*(?:\.\d+)?",  # the last number, commas dropped
    "boxed": r"\\boxed\{([^{}]*)\}",  # LaTeX \boxed{...}
    "last_line": None,  # the last non-empty line
}
MAX_SAMPLES = 64


class InvalidSelfConsistencyError(InvalidRequestError):
    """A self-consistency setting that cannot be used (a bad regex, too many samples, ...)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelfConsistency:
    """How to vote over samples.

    Attributes:
      answer: a built-in extractor ("number", "boxed", "last_line") or a regular expression (its
        first group, else the whole match; the last match in the output counts).
      max_samples: most samples drawn (2..MAX_SAMPLES).
      stop_when: "decided": stop once the remaining samples cannot change the winner; "never":
        draw all; a number p in (0.5, 1]: also stop once at least `min_samples` voted and the
        leader holds a share >= p of the votes (a confidence rule: it can change the winner).
      min_samples: votes needed before a share rule may stop (default 3).
      weighted: each vote counts exp(mean log-probability of its tokens) instead of 1.
    """

    answer: str = "number"
    max_samples: int = 8
    stop_when: str | float = "decided"
    min_samples: int = 3
    weighted: bool = False

    def __post_init__(self):
        def bad(msg):
            raise InvalidSelfConsistencyError(msg)

        if not isinstance(self.answer, str) or not self.answer:
            bad(f"self_consistency.answer must be {sorted(EXTRACTORS)} or a regex, got {self.answer!r}")
        if self.answer not in EXTRACTORS:
            try:
                re.compile(self.answer)
            except re.error as e:
                bad(f"self_consistency.answer is not a valid regex: {e}")
        n = self.max_samples
        if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_SAMPLES:
            bad(f"self_consistency.max_samples must be an integer in [2, {MAX_SAMPLES}], got {n!r}")
        s = self.stop_when
        if not (s in ("decided", "never") or (isinstance(s, (int, float)) and not isinstance(s, bool)
                                              and 0.5 < s <= 1)):
            bad(f"self_consistency.stop_when must be 'decided', 'never' or a share in (0.5, 1], got {s!r}")
        if isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int) or self.min_samples < 1:
            bad(f"self_consistency.min_samples must be an integer >= 1, got {self.min_samples!r}")
        if not isinstance(self.weighted, bool):
            bad(f"self_consistency.weighted must be true or false, got {self.weighted!r}")

    def extract(self, text: str) -> str | None:
        """The answer in a sample's text (None: it gave none)."""
        if self.answer == "last_line":
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            return lines[-1] if lines else None
        matches = list(re.finditer(EXTRACTORS.get(self.answer) or self.answer, text))
        if not matches:
            return None
        m = matches[-1]
        value = m.group(1) if m.groups() else m.group(0)
        if self.answer == "number":
            value = value.replace(",", "")
        return value.strip()


@dataclasses.dataclass
class SelfConsistencyResult:
    """The vote of a finished self-consistency request.

    Attributes:
      answer: the winner (None if no sample gave an answer); ties go to the answer reached first.
      votes: answer -> votes (weighted: summed confidence).
      num_samples: samples that finished and voted (the rest were stopped early).
      num_tokens: tokens generated over every sample, stopped ones included (the cost).
      stopped_early: whether samples were stopped before the end.
      num_stopped: samples stopped (or never run) once the vote was decided.
    """

    answer: str | None
    votes: dict[str, float]
    num_samples: int
    num_tokens: int
    stopped_early: bool
    num_stopped: int = 0


def tally(answers: list[tuple[str | None, float]]) -> dict[str, float]:
    """answer -> votes, in the order answers first appeared (abstentions left out)."""
    votes: dict[str, float] = {}
    for answer, weight in answers:
        if answer is not None:
            votes[answer] = votes.get(answer, 0.0) + weight
    return votes


def winner(votes: dict[str, float]) -> str | None:
    """The answer with the most votes; a tie goes to the one that appeared first."""
    best = None
    for answer, count in votes.items():
        if best is None or count > votes[best]:
            best = answer
    return best


def decided(votes: dict[str, float], remaining: int) -> bool:
    """Whether `remaining` more votes (each at most 1) can no longer change the winner."""
    if not votes:
        return remaining == 0
    ranked = sorted(votes.values(), reverse=True)
    second = ranked[1] if len(ranked) > 1 else 0.0
    return ranked[0] - second > remaining


def should_stop(sc: SelfConsistency, votes: dict[str, float], num_voted: int, remaining: int) -> bool:
    """The request's stop rule after a step (see `SelfConsistency.stop_when`)."""
    if remaining == 0:
        return True
    if sc.stop_when == "never":
        return False
    if decided(votes, remaining):
        return True
    if sc.stop_when != "decided" and votes and num_voted >= sc.min_samples:
        return max(votes.values()) / sum(votes.values()) >= sc.stop_when
    return False


def confidence(cumulative_logprob: float, num_tokens: int) -> float:
    """A sample's weight with weighted voting: exp(mean token log-probability), in (0, 1]."""
    return math.exp(cumulative_logprob / max(num_tokens, 1))
