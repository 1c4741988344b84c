"""The on-device sampler (SamplingParams, host side, lives in sampling_params.py).

The sampler is a few small pure functions, jit-friendly with per-row parameters so one compiled
step serves any mix of greedy and sampled requests:

    logits [B, V] -> penalties (repetition, presence, frequency; min_tokens suppression)
                  -> temperature -> top-k, top-p, min-p masks -> categorical draw with the row's key
    logprobs      -> log_softmax of the raw logits (before penalties and temperature, as vLLM
                     returns them): the sampled token's and the top-N

Each row's key is fold_in(PRNGKey(seed), number of tokens generated so far), so a seeded request
draws the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.sampling_params import SamplingParams

__all__ = ["SamplingParams", "apply_penalties", "greedy", "logprobs", "mask_logits", "sample", "step_keys"]


def greedy(logits: jax.Array) -> jax.Array:
    """logits [B, V] -> [B] int32."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def mask_logits(logits, temperature, top_k, top_p, min_p=None):
    """Scaled, masked logits in descending order, and the vocabulary ids of that order.

    logits [B, V] f32; temperature, top_p [B] f32; top_k [B] int32 (<= 0 disables); min_p [B] f32
    (keep tokens at least min_p times as likely as the most likely one; 0 disables).
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
    if min_p is not None:
        keep &= probs >= min_p[:, None] * probs[:, :1]
    return jnp.where(keep, sorted_logits, -jnp.inf), sorted_ids


def sample(logits, temperature, top_k, top_p, keys, min_p=None):
    """Per-row sampling; rows with temperature 0 are greedy.

    logits [B, V] f32; temperature, top_p [B] f32; top_k [B] int32; keys [B, 2] uint32 raw keys;
    min_p [B] f32 or None.
    Returns [B] int32 token ids.

    The draw is always made over the vocabulary in its own order (the filters only mask tokens
    out), so a row's token depends on its key and its own parameters, never on which branch its
    batch took. Batches where no row filters (top-k, top-p, min-p all off) skip the sort over the
    vocabulary: on SmolLM2 (V = 49152) on CPU the sort took about twice the model's step time.
    """
    V = logits.shape[-1]
    scaled = lambda: logits / jnp.maximum(temperature, 1e-6)[:, None]  # noqa: E731  (inside the branches)

    def draw(masked):
        drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy(logits))

    filters = (top_k > 0) & (top_k < V) | (top_p < 1)
    if min_p is not None:
        filters |= min_p > 0

    def filtered(_):
        sorted_logits, _ = mask_logits(logits, temperature, top_k, top_p, min_p)
        # The kept tokens are a prefix of the descending order: keep every token at least as likely
        # as the last kept one (rows without filters keep everything, as in the unfiltered branch).
        n_keep = jnp.sum(jnp.isfinite(sorted_logits), axis=-1)
        threshold = jnp.take_along_axis(sorted_logits, jnp.maximum(n_keep - 1, 0)[:, None], axis=-1)
        threshold = jnp.where(filters[:, None], threshold, -jnp.inf)
        x = scaled()
        return draw(jnp.where(x >= threshold, x, -jnp.inf))
    sampled = temperature > 0
    return jax.lax.cond(
        jnp.all(~sampled), lambda _: greedy(logits),
        lambda _: jax.lax.cond(jnp.any(filters & sampled), filtered, lambda _: draw(scaled()), None), None)


def step_keys(seeds, num_generated):
    """seeds [B] uint32, num_generated [B] int32 -> [B, 2] raw keys for this step."""
    make = lambda s, n: jax.random.fold_in(jax.random.PRNGKey(s), n)  # noqa: E731
    return jax.vmap(make)(seeds, num_generated)


def apply_penalties(logits, seen, output_counts, repetition_penalty, presence_penalty, frequency_penalty,
                    suppress=None):
    """The vLLM / OpenAI penalties, per row.

    logits [B, V] f32; seen [B, V] bool (token in the prompt or the output); output_counts [B, V]
    f32 (times each token was generated); repetition_penalty [B] (1 disables: a seen token's
    positive logit is divided by it, a negative one multiplied); presence_penalty,
    frequency_penalty [B] (0 disables: subtract presence once and frequency per occurrence, for
    generated tokens); suppress [B, V] bool or None (tokens that may not be sampled yet, e.g. EOS
    before min_tokens).
    """
    rp = repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    logits = logits - frequency_penalty[:, None] * output_counts \
        - presence_penalty[:, None] * (output_counts > 0).astype(logits.dtype)
    if suppress is not None:
        logits = jnp.where(suppress, -jnp.inf, logits)
    return logits


def logprobs(logits, token_ids, num_top: int):
    """Log-probabilities under the raw distribution.

    logits [B, V] f32; token_ids [B] int32. Returns (token_logprob [B], top_ids [B, num_top] int32,
    top_logprobs [B, num_top]), the top ones in descending order.
    """
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, token_ids[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, num_top)
    return chosen, top_ids.astype(jnp.int32), top_lp
