"""Sampling parameters (host side) and the on-device sampler.

The sampler is three small pure functions, jit-friendly with per-row parameters so one compiled
step serves any mix of greedy and sampled requests:

    logits [B, V] -> (temperature, top-k, top-p masks) -> categorical draw with the row's own key

Each row's key is fold_in(PRNGKey(seed), number of tokens generated so far), so a seeded request
draws the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

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


def greedy(logits: jax.Array) -> jax.Array:
    """logits [B, V] -> [B] int32."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def mask_logits(logits, temperature, top_k, top_p):
    """Scaled, masked logits in descending order, and the vocabulary ids of that order.

    logits [B, V] f32; temperature, top_p [B] f32; top_k [B] int32 (<= 0 disables).
    Returns (sorted_logits [B, V] with -inf outside the kept set, sorted_ids [B, V]).
    """
    V = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    sorted_ids = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, sorted_ids, axis=-1)
    rank = jnp.arange(V)[None, :]
    k = jnp.where(top_k > 0, top_k, V)[:, None]
    sorted_logits = jnp.where(rank < k, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
    keep = (mass_before < top_p[:, None]) | (rank == 0)
    return jnp.where(keep, sorted_logits, -jnp.inf), sorted_ids


def sample(logits, temperature, top_k, top_p, keys):
    """Per-row sampling; rows with temperature 0 are greedy.

    logits [B, V] f32; temperature, top_p [B] f32; top_k [B] int32; keys [B, 2] uint32 raw keys.
    Returns [B] int32 token ids.
    """

    def draw(_):
        sorted_logits, sorted_ids = mask_logits(logits, temperature, top_k, top_p)
        choice = jax.vmap(jax.random.categorical)(keys, sorted_logits)  # [B] index into the order
        drawn = jnp.take_along_axis(sorted_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy(logits))

    # All-greedy batches skip the sort over the vocabulary entirely.
    return jax.lax.cond(jnp.all(temperature == 0), lambda _: greedy(logits), draw, None)


def step_keys(seeds, num_generated):
    """seeds [B] uint32, num_generated [B] int32 -> [B, 2] raw keys for this step."""
    make = lambda s, n: jax.random.fold_in(jax.random.PRNGKey(s), n)  # noqa: E731
    return jax.vmap(make)(seeds, num_generated)
