"""Verification of drafts on the device (inside the sampler's jit; see `jaxinfer.speculative`)."""

from __future__ import annotations

import jax.numpy as jnp

from jaxinfer.sampling import sample, step_keys


def verify(logits, drafts, num_drafts, temperature, top_k, top_p, min_p, seeds, first_index, depth=None):
    """The target's token at every position of a verify chunk and how many drafts it accepts.

    logits [S, K + 1, V] f32: row s, position j predicts the token after the chunk's j-th token (its
    last known token, then its drafts); drafts [S, K] int32; num_drafts [S] int32 (<= K; 0: a plain
    decode); temperature, top_k, top_p, min_p, seeds [S]; first_index [S] int32: the output index
    of the token position 0 samples (plain decoding's key for it: fold_in(seed, index)).

    Returns (tokens [S, K + 1] int32, num_accepted [S] int32): the request's new tokens are
    tokens[s, :num_accepted[s] + 1] (the accepted drafts, which equal the target's tokens, then the
    target's token after them). Position j draws with the key plain decoding uses for output index
    first_index + j and the same filters, so each new token is the one plain decoding would emit.
    depth [S, K + 1] (a draft tree's rows, `tree.row_depths`): row j draws for output index
    first_index + depth[s, j]; its acceptance is `tree.accept`'s (num_accepted here: a chain's).
    """
    S, K1, V = logits.shape
    rep = lambda a: jnp.repeat(a, K1, axis=0)  # noqa: E731  per position
    offset = jnp.arange(K1, dtype=jnp.int32)[None] if depth is None else depth
    index = (first_index[:, None] + offset).reshape(-1)
    keys = step_keys(rep(seeds), index)
    tokens = sample(logits.reshape(S * K1, V), rep(temperature), rep(top_k), rep(top_p), keys,
                    rep(min_p)).reshape(S, K1)
    K = K1 - 1
    match = (tokens[:, :K] == drafts) & (jnp.arange(K)[None] < num_drafts[:, None])
    num_accepted = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    return tokens, num_accepted
