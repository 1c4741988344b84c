"""Reasoning: a model's thinking split from its answer (`reasoning_content` / `content`), and a
thinking budget enforced by the sampler.

    --reasoning-parser NAME       the markers of a model family's thinking section (REASONING_PARSERS)
    split / ReasoningStream       output text -> (reasoning, content), whole or streamed delta by delta
    SamplingParams(thinking_token_budget=N, min_thinking_tokens=M)
      -> ThinkingBudget (runner, per sample): counts the tokens sampled inside the thinking section;
         at N it forces the end marker token by token (a one-token mask in the sampler, the same
         packed bitmask as structured outputs), then the answer continues; before M tokens the end
         marker's first token is masked out. With a budget the section ends with its end marker:
         end-of-sequence is kept out inside it and right after a forced marker (an answer follows).
         A grammar (structured outputs) applies to the answer, after the thinking section.

A thinking section is open when the prompt ends with the start marker (a template or a
continued assistant message opened it) or when the output begins with it.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

# name -> (start marker, end marker). The families differ in template, not in markers.
REASONING_PARSERS = {"think": ("<think>", "</think>"), "deepseek_r1": ("<think>", "</think>"),
                     "qwen3": ("<think>", "</think>")}
DEFAULT_MARKERS = REASONING_PARSERS["think"]


class ReasoningSpec(NamedTuple):
    """A request's thinking section as the server splits its output: the markers (and their token
    ids, to count reasoning tokens) and whether its prompt opened the section."""

    markers: tuple[str, str]
    in_thinking: bool
    start_ids: list[int]
    end_ids: list[int]


def opens_thinking(prompt_text: str, markers: tuple[str, str] = DEFAULT_MARKERS) -> bool:
    """Whether a prompt leaves the model inside a thinking section."""
    start, end = markers
    tail = prompt_text.rstrip()
    return tail.endswith(start)


def split(text: str, in_thinking: bool, markers: tuple[str, str] = DEFAULT_MARKERS) -> tuple[str | None, str | None]:
    """An output's (reasoning, content): the thinking section (without its markers) and what follows
    it. `in_thinking`: the prompt opened the section. A section never closed is all reasoning."""
    start, end = markers
    if not in_thinking:
        stripped = text.lstrip()
        if not stripped.startswith(start):
            return None, text
        text = stripped[len(start):]
    reasoning, found, content = text.partition(end)
    if not found:
        return reasoning, None
    return reasoning, content.lstrip("\n") or None


def count_reasoning_tokens(token_ids: list[int], start_ids: list[int], end_ids: list[int], in_thinking: bool) -> int:
    """Tokens of an output inside its thinking section (markers not counted)."""
    if not in_thinking:
        if token_ids[:len(start_ids)] != start_ids:
            return 0
        token_ids = token_ids[len(start_ids):]
    for i in range(len(token_ids) - len(end_ids) + 1):
        if token_ids[i:i + len(end_ids)] == end_ids:
            return i
    return len(token_ids)


class ReasoningStream:
    """`split` over a stream of text deltas: feed(delta) -> (reasoning delta, content delta), holding
    back a tail that may be the start of a marker."""

    def __init__(self, in_thinking: bool, markers: tuple[str, str] = DEFAULT_MARKERS):
        self.markers = markers
        self.state = "thinking" if in_thinking else "start"  # start: may still open a section
        self.buffer = ""
        self.content_started = False

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        start, end = self.markers
        self.buffer += delta
        reasoning = content = ""
        if self.state == "start":
            stripped = self.buffer.lstrip()
            if stripped.startswith(start):
                self.buffer, self.state = stripped[len(start):], "thinking"
            elif start.startswith(stripped) and not final:
                return "", ""  # could still be the start marker
            else:
                self.state = "answer"
        if self.state == "thinking":
            before, found, after = self.buffer.partition(end)
            if found:
                reasoning, self.buffer, self.state = before, after, "answer"
            else:
                keep = 0 if final else _partial_suffix(self.buffer, end)
                reasoning, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        if self.state == "answer":
            content, self.buffer = self.buffer, ""
            if not self.content_started:
                content = content.lstrip("\n")
                self.content_started = bool(content)
        return reasoning, content


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ThinkingBudget:
    """One sample's thinking section in the runner: counts what it samples there, forces the end
    marker at the budget, keeps the marker's first token out before the minimum; then hands over to
    `grammar` (structured outputs on the answer), if any.

    With a grammar and a prompt that does not open the section, the output cannot open one (the
    grammar applies from the first token)."""

    __slots__ = ("start_ids", "end_ids", "budget", "minimum", "thinking", "count", "forcing", "recent", "grammar",
                 "head", "eos_ids", "guard")

    def __init__(self, start_ids: Sequence[int], end_ids: Sequence[int], budget: int | None, minimum: int,
                 in_thinking: bool, grammar=None, eos_token_ids: Sequence[int] = ()):
        self.start_ids, self.end_ids = list(start_ids), list(end_ids)
        self.budget, self.minimum = budget, minimum
        self.thinking = in_thinking
        # the output's first tokens, while they may still be the start marker (None: decided)
        self.head: list[int] | None = None if in_thinking or grammar is not None else []
        self.count = 0  # tokens sampled inside the section
        self.forcing: list[int] = []  # the end marker's tokens still to force
        self.recent: list[int] = []  # the section's last tokens (to find an end marker the model writes)
        self.grammar = grammar
        self.eos_ids = list(eos_token_ids)
        self.guard = False  # the first token after a forced end marker: not end-of-sequence (an answer follows)

    def accept(self, token_ids: Sequence[int]) -> bool:
        ok = True
        for token in map(int, token_ids):
            if self.head is not None:  # does the output open the section?
                self.head.append(token)
                if self.head == self.start_ids:
                    self.head, self.thinking = None, True
                elif self.head != self.start_ids[:len(self.head)]:
                    self.head = None
                continue
            if not self.thinking:
                self.guard = False
                if self.grammar is not None:
                    ok = self.grammar.accept([token]) and ok
                continue
            if self.forcing:  # (the sampler could pick nothing else)
                self.forcing.pop(0)
                self.thinking = bool(self.forcing)
                self.guard = not self.thinking and self.grammar is None and bool(self.eos_ids)
                continue
            self.recent = (self.recent + [token])[-len(self.end_ids):]
            if self.recent == self.end_ids:  # the model closed the section itself
                self.thinking = False
                self.count -= len(self.end_ids) - 1  # (its first tokens were counted as thinking)
                continue
            self.count += 1
        return ok

    @property
    def thinking_tokens(self) -> int:
        return self.count

    @property
    def error(self) -> str | None:
        return None if self.grammar is None else self.grammar.error

    def restrict(self, row: np.ndarray):
        """Writes this step's allowed tokens into `row` (int32 words, all ones on entry) where the
        section restricts them; returns the answer's grammar when it is the one to fill the row."""
        if not self.thinking:
            if self.guard:
                _clear(row, self.eos_ids)
                return None
            return self.grammar if self.head is None else None
        if not self.forcing and self.budget is not None and self.count >= self.budget:
            self.forcing = list(self.end_ids)  # the budget is spent: the end marker, token by token
        if self.forcing:
            row[:] = 0
            token = self.forcing[0]
            row[token // 32] = np.uint32(1 << (token % 32)).view(np.int32)
            return None
        if self.count < self.minimum:
            _clear(row, self.end_ids[:1])
        if self.budget is not None:  # a budgeted section ends with its end marker, not the sequence
            _clear(row, self.eos_ids)
        return None

    @property
    def restricts(self) -> bool:
        """Whether this step's row needs a mask at all."""
        if self.thinking:
            return bool(self.forcing) or self.budget is not None or self.count < self.minimum
        return self.guard or (self.head is None and self.grammar is not None)


def _clear(row: np.ndarray, token_ids) -> None:
    """Takes tokens out of a packed allowed-token row."""
    for token in token_ids:
        row[token // 32] &= np.uint32(~(1 << (token % 32)) & 0xFFFFFFFF).view(np.int32)
