"""Sampling parameters: how to pick tokens for one request (host side, no jax import).

Validated on construction: a bad value raises `InvalidSamplingParamsError` saying what to change,
before the request reaches the scheduler or the device.
"""

from __future__ import annotations

import dataclasses
import math

from jaxinfer.errors import InvalidSamplingParamsError


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens for one request (the vLLM names and meanings).

    Attributes:
      max_tokens: most new tokens to generate (> 0).
      temperature: 0 is greedy; higher flattens the distribution (>= 0).
      top_p: nucleus sampling: keep the smallest set of tokens whose probability sums to top_p,
        in (0, 1]; 1 disables it.
      top_k: keep only the k most likely tokens; 0 or -1 disables it.
      seed: per-request random seed for reproducible sampling; None draws one.
      stop: strings that end generation; the returned text stops before them.
      stop_token_ids: extra token ids that end generation (kept in token_ids, not in text).
      ignore_eos: keep generating past the model's end-of-sequence tokens.
      skip_special_tokens: leave control tokens out of the returned text.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | str | None = None
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        def bad(msg):
            raise InvalidSamplingParamsError(msg)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
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

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0
