"""Sampling parameters: how to pick tokens for one request (host side, no jax import).

Validated on construction: a bad value raises `InvalidSamplingParamsError` saying what to change,
before the request reaches the scheduler or the device.
"""

from __future__ import annotations

import dataclasses
import enum
import math

from jaxinfer.errors import InvalidSamplingParamsError
from jaxinfer.self_consistency import SelfConsistency
from jaxinfer.structured_output import StructuredOutputsParams, to_params

MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's top_logprobs limit)


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request carries (vLLM's names)."""

    CUMULATIVE = "cumulative"  # everything so far, every step (O(n) per step: for small outputs)
    DELTA = "delta"  # only what is new since the previous output (streaming: O(1) per step)
    FINAL_ONLY = "final_only"  # one output, when the request finishes (LLM.generate)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens for one request (the vLLM names and meanings).

    Attributes:
      n: number of parallel samples for the prompt (they share the prompt's KV pages).
      best_of: draw this many samples (>= n, sharing the prompt's pages) and return the n best by
        `best_of_score`; None: n. Outputs come when the request finishes (not with DELTA).
      best_of_score: "mean" (the mean log-probability per generated token, OpenAI's "highest log
        probability per token") or "sum" (the sequence's log-probability), of each token under the
        model's raw distribution (before temperature and the filters, as `logprobs` reports it).
      max_tokens: most new tokens to generate (> 0).
      min_tokens: generate at least this many tokens before EOS or a stop token may end it.
      temperature: 0 is greedy; higher flattens the distribution (>= 0).
      top_p: nucleus sampling: keep the smallest set of tokens whose probability sums to top_p,
        in (0, 1]; 1 disables it.
      top_k: keep only the k most likely tokens; 0 or -1 disables it.
      min_p: keep only tokens at least min_p times as likely as the most likely one; 0 disables it.
      repetition_penalty: > 1 discourages tokens already in the prompt or output (1 disables it).
      presence_penalty: in [-2, 2]; subtracted once from the logit of every generated token.
      frequency_penalty: in [-2, 2]; subtracted per occurrence of every generated token.
      seed: per-request random seed for reproducible sampling; None draws one. Sample i of n > 1
        uses seed + i.
      logprobs: return the sampled token's log-probability and this many top alternatives
        (None: no logprobs; 0: the sampled token's only). At most MAX_LOGPROBS.
      prompt_logprobs: the same for every prompt token after the first (None: no).
      stop: strings that end generation; the returned text stops before them.
      stop_token_ids: extra token ids that end generation (kept in token_ids, not in text).
      ignore_eos: keep generating past the model's end-of-sequence tokens.
      skip_special_tokens: leave control tokens out of the returned text.
      output_kind: what each output of the request carries (`RequestOutputKind`).
      structured_outputs: what the output must match: a JSON schema, any JSON object, a regex, one
        of several strings or a grammar (`StructuredOutputsParams`, or a dict of its fields);
        None: unconstrained. With a thinking section (below) it applies to the answer after it.
      thinking_token_budget: most tokens sampled inside a thinking section (a prompt that ends with
        `reasoning_markers[0]` opens one, or an output that begins with it); at the budget the end
        marker is forced, token by token, and the answer follows. None: no limit.
      min_thinking_tokens: the end marker's first token is kept out until this many were sampled.
      reasoning_markers: (start, end) of the model family's thinking section (`jaxinfer.reasoning`).
      self_consistency: draw up to `max_samples` samples, extract and majority-vote their answers,
        stop early once the vote is decided (`jaxinfer.self_consistency.SelfConsistency`, or a dict
        of its fields); the result is `RequestOutput.self_consistency`. Needs n = 1, no best_of.
    """

    n: int = 1
    best_of: int | None = None
    best_of_score: str = "mean"
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    thinking_token_budget: int | None = None
    min_thinking_tokens: int = 0
    reasoning_markers: tuple[str, str] = ("<think>", "</think>")
    self_consistency: SelfConsistency | None = None
    use_beam_search: bool = False
    beam_width: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self):
        def bad(msg, param=None):
            raise InvalidSamplingParamsError(msg, param)

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not is_int(self.n) or self.n <= 0:
            bad(f"n must be a positive integer, got {self.n!r}")
        if self.best_of is not None and (not is_int(self.best_of) or self.best_of < self.n):
            bad(f"best_of must be None or an integer >= n={self.n}, got {self.best_of!r}", "best_of")
        if self.best_of_score not in ("mean", "sum"):
            bad(f"best_of_score must be 'mean' or 'sum', got {self.best_of_score!r}")
        if not is_int(self.max_tokens) or self.max_tokens <= 0:
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            bad(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1] (0 disables it), got {self.min_p!r}")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_num(value) or not -2 <= value <= 2:
                bad(f"{name} must be in [-2, 2] (0 disables it), got {value!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                bad(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1] (1 disables nucleus sampling), got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be an integer >= 1, or 0 / -1 to disable it, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad(f"seed must be an integer or None, got {self.seed!r}")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not all(isinstance(s, str) and s for s in stop):
            bad(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        ids = tuple(self.stop_token_ids or ())
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        if not isinstance(self.output_kind, RequestOutputKind):
            try:
                object.__setattr__(self, "output_kind", RequestOutputKind(self.output_kind))
            except ValueError:
                bad(f"output_kind must be one of {[k.value for k in RequestOutputKind]}, got {self.output_kind!r}")
        sc = self.self_consistency
        if isinstance(sc, dict):
            sc = SelfConsistency(**sc)
            object.__setattr__(self, "self_consistency", sc)
        if sc is not None:
            if not isinstance(sc, SelfConsistency):
                bad(f"self_consistency must be a SelfConsistency (or a dict of its fields), got {type(sc).__name__}")
            if self.n != 1 or self.best_of is not None:
                bad("self_consistency returns one voted answer: leave n at 1 and best_of out", "self_consistency")
            if self.output_kind is RequestOutputKind.DELTA:
                bad("self_consistency votes once its samples finish: it does not stream", "self_consistency")
        if self.num_samples > self.n and self.output_kind is RequestOutputKind.DELTA and not self.use_beam_search:
            bad(f"best_of={self.best_of} > n={self.n} picks the best samples once they finish: it does not stream "
                "(leave best_of out, or do not stream)", "best_of")
        object.__setattr__(self, "structured_outputs", to_params(self.structured_outputs))
        budget = self.thinking_token_budget
        if budget is not None and (not is_int(budget) or budget < 0):
            bad(f"thinking_token_budget must be None or an integer >= 0, got {budget!r}")
        if not is_int(self.min_thinking_tokens) or self.min_thinking_tokens < 0 or (
                budget is not None and self.min_thinking_tokens > budget):
            bad("min_thinking_tokens must be an integer in [0, thinking_token_budget], "
                f"got {self.min_thinking_tokens!r}")
        markers = tuple(self.reasoning_markers) if isinstance(self.reasoning_markers, (list, tuple)) else ()
        if len(markers) != 2 or not all(isinstance(m, str) and m for m in markers) or markers[0] == markers[1]:
            bad(f"reasoning_markers must be two different non-empty strings, got {self.reasoning_markers!r}")
        object.__setattr__(self, "reasoning_markers", markers)
        self._check_beam_search(bad, is_int, is_num)

    def _check_beam_search(self, bad, is_int, is_num) -> None:
        if not isinstance(self.use_beam_search, bool):
            bad(f"use_beam_search must be true or false, got {self.use_beam_search!r}", "use_beam_search")
        if not is_num(self.length_penalty):
            bad(f"length_penalty must be a finite number, got {self.length_penalty!r}", "length_penalty")
        if self.early_stopping not in (True, False, "never") or isinstance(self.early_stopping, int) and \
                not isinstance(self.early_stopping, bool):
            bad(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}", "early_stopping")
        if not self.use_beam_search:
            if self.length_penalty != 1.0 or self.early_stopping is not False:
                bad("length_penalty and early_stopping apply to beam search: set use_beam_search=True or leave "
                    "them out", "use_beam_search")
            return
        if not is_int(self.beam_width) or self.beam_width < 1:
            bad(f"beam_width must be an integer >= 1, got {self.beam_width!r}", "beam_width")
        if self.n > self.beam_width:
            bad(f"beam search returns at most beam_width={self.beam_width} sequences: n={self.n} is too many "
                "(raise beam_width or lower n)", "n")
        if self.temperature != 0:
            bad(f"beam search picks the most likely sequences: set temperature=0 (got {self.temperature!r})",
                "temperature")
        conflicts = [name for name, on in (
            ("best_of", self.best_of is not None), ("self_consistency", self.self_consistency is not None),
            ("structured_outputs", self.structured_outputs is not None), ("stop", bool(self.stop)),
            ("min_tokens", self.min_tokens > 0), ("repetition/presence/frequency penalties", self.needs_penalties),
            ("thinking_token_budget / min_thinking_tokens", self.limits_thinking),
            ("prompt_logprobs", self.prompt_logprobs is not None)) if on]
        if conflicts:
            bad(f"beam search does not combine with {', '.join(conflicts)}: leave them out or use sampling",
                "use_beam_search")
        if self.output_kind is RequestOutputKind.DELTA:
            bad("beam search ranks its beams once they finish: it does not stream", "stream")

    @property
    def num_samples(self) -> int:
        """Samples drawn for the request: beam_width beams, self-consistency's max_samples, best_of, else n."""
        if self.use_beam_search:
            return self.beam_width
        if self.self_consistency is not None:
            return self.self_consistency.max_samples
        return self.best_of if self.best_of is not None else self.n

    def ending_token_ids(self, eos_token_ids) -> set[int]:
        """The tokens that end a sequence: stop_token_ids and, unless ignore_eos, the model's EOS."""
        return set(self.stop_token_ids) | (set() if self.ignore_eos else set(eos_token_ids))

    @property
    def limits_thinking(self) -> bool:
        """Whether the sampler watches a thinking section (a budget or a minimum)."""
        return self.thinking_token_budget is not None or self.min_thinking_tokens > 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        """Whether sampling needs the per-token history (penalties) on the device."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
