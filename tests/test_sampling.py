"""The on-device sampler: greedy, temperature, top-k, top-p, per-request seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import sampling

# The sampler always runs inside the jit steps; test it the same way.
sample = jax.jit(sampling.sample)
step_keys = jax.jit(sampling.step_keys)
mask_logits = jax.jit(sampling.mask_logits)


def _sample(logits, temperature, top_k=0, top_p=1.0, seed=0, step=0):
    B = logits.shape[0]
    seeds = np.broadcast_to(np.asarray(seed, np.uint32), (B,))
    keys = step_keys(jnp.asarray(seeds), jnp.full((B,), step, jnp.int32))
    return np.asarray(sample(jnp.asarray(logits, jnp.float32), jnp.full((B,), temperature, jnp.float32),
                             jnp.full((B,), top_k, jnp.int32), jnp.full((B,), top_p, jnp.float32), keys))


def test_temperature_zero_is_argmax():
    logits = np.random.default_rng(0).standard_normal((4, 100))
    np.testing.assert_array_equal(_sample(logits, 0.0), logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_argmax():
    logits = np.random.default_rng(1).standard_normal((4, 100))
    for seed in range(3):
        np.testing.assert_array_equal(_sample(logits, 1.0, top_k=1, seed=seed), logits.argmax(-1))
        np.testing.assert_array_equal(_sample(logits, 1.0, top_p=1e-6, seed=seed), logits.argmax(-1))


def test_frequencies_follow_the_softmax():
    logits = np.repeat(np.log(np.array([[0.5, 0.3, 0.15, 0.05]])), 4000, axis=0)
    draws = _sample(logits, 1.0, seed=np.arange(4000))  # 4000 rows, each with its own seed
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_top_k_and_top_p_masks():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    one = jnp.ones((1,), jnp.float32)
    masked, order = mask_logits(logits, one, jnp.array([2], jnp.int32), one)
    assert np.asarray(order)[0, :2].tolist() == [1, 3]
    assert np.isfinite(np.asarray(masked)[0]).tolist() == [True, True, False, False]
    # top_p 0.7: 0.5 + 0.3 reach it, so exactly two tokens stay.
    masked, _ = mask_logits(logits, one, jnp.zeros((1,), jnp.int32), jnp.array([0.7]))
    assert np.isfinite(np.asarray(masked)[0]).sum() == 2
    draws = set(_sample(np.repeat(np.asarray(logits), 400, axis=0), 1.0, top_p=0.7, seed=np.arange(400)).tolist())
    assert draws == {1, 3}


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = np.random.default_rng(2).standard_normal((1, 50))
    alone = _sample(logits, 1.0, seed=7, step=3)[0]
    batch = np.repeat(logits, 4, axis=0)
    keys = step_keys(jnp.array([1, 7, 9, 7], jnp.uint32), jnp.array([0, 3, 3, 3], jnp.int32))
    out = np.asarray(sample(jnp.asarray(batch, jnp.float32), jnp.array([1.0, 1.0, 0.0, 1.0]),
                            jnp.zeros((4,), jnp.int32), jnp.ones((4,)), keys))
    assert out[1] == alone and out[3] == alone
    assert out[2] == logits.argmax()


def test_a_row_draws_the_same_whether_or_not_its_batch_filters():
    """Filtering in one row (the sorted branch) leaves an unfiltered row's draw unchanged, and a
    top-k row draws only among its k best tokens."""
    logits = np.random.default_rng(3).standard_normal((2, 300))
    keys = step_keys(jnp.array([11, 12], jnp.uint32), jnp.array([0, 0], jnp.int32))
    run = lambda top_k: np.asarray(sample(jnp.asarray(logits, jnp.float32), jnp.ones((2,)),  # noqa: E731
                                          jnp.array(top_k, jnp.int32), jnp.ones((2,)), keys))
    plain, mixed = run([0, 0]), run([0, 5])
    assert mixed[0] == plain[0]
    assert mixed[1] in np.argsort(-logits[1])[:5]
    for seed in range(50):  # and over many keys: the top-5 row never leaves its top 5
        k = step_keys(jnp.array([seed, seed], jnp.uint32), jnp.array([0, 1], jnp.int32))
        out = np.asarray(sample(jnp.asarray(logits, jnp.float32), jnp.ones((2,)), jnp.array([0, 5], jnp.int32),
                                jnp.ones((2,)), k))
        assert out[1] in np.argsort(-logits[1])[:5]


def _kept_by_sorting(logits, temperature, top_k, top_p, min_p):
    """mask_logits' kept set, widened to every token tied with the last kept one (as the sampler keeps)."""
    masked, _ = mask_logits(logits, temperature, top_k, top_p, min_p)
    masked = np.asarray(masked)
    last = np.where(np.isfinite(masked), masked, np.inf).min(axis=-1, keepdims=True)
    return np.asarray(logits / np.maximum(np.asarray(temperature), 1e-6)[:, None]) >= last


def _random_filters(rng, B, V):
    return (jnp.asarray(rng.uniform(0.2, 2.0, B), jnp.float32),
            jnp.asarray(rng.choice([0, 1, 2, 7, 40, V - 1, V, V + 5], B), jnp.int32),
            jnp.asarray(rng.choice([1.0, 0.999, 0.9, 0.5, 0.1, 1e-6], B), jnp.float32),
            jnp.asarray(rng.choice([0.0, 0.0, 0.01, 0.2, 0.9], B), jnp.float32))


def test_keep_mask_keeps_what_sorting_keeps():
    """The sampler's sort-free thresholds against the sorted definition, over random filters, with
    -inf logits (suppressed tokens), ties, a flat row and large values."""
    keep_mask = jax.jit(sampling.keep_mask)
    rng = np.random.default_rng(4)
    for trial in range(6):
        B, V = 64, int(rng.choice([5, 97, 1000]))
        logits = rng.standard_normal((B, V)).astype(np.float32) * rng.choice([0.1, 3.0, 30.0])
        logits[:8] = np.round(logits[:8])  # ties
        logits[8] = 0.0  # a flat row
        logits[9:16, : V // 3] = -np.inf  # suppressed tokens (penalties, min_tokens)
        logits[16] *= 1e4
        temperature, top_k, top_p, min_p = _random_filters(rng, B, V)
        logits = jnp.asarray(logits)
        finite = np.isfinite(np.asarray(logits))  # (keeping a -inf logit changes nothing)
        # as drawn, then with no row using top-k, then none using top-p (each search is skipped)
        for filters in ((top_k, top_p), (jnp.zeros_like(top_k), top_p), (top_k, jnp.ones_like(top_p))):
            got = np.asarray(keep_mask(logits, temperature, *filters, min_p))
            want = _kept_by_sorting(logits, temperature, *filters, min_p)
            np.testing.assert_array_equal(got & finite, want & finite, err_msg=f"trial {trial}")
        assert got.any(axis=-1).all()  # the best token always stays


def test_keep_mask_matches_hf_warpers():
    """Temperature, top-k, top-p, min-p in HF transformers' order, one row at a time, against the
    kept set of the sampler's thresholds."""
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(5)
    B, V = 48, 2000
    logits = (rng.standard_normal((B, V)) * 4).astype(np.float32)
    temperature, top_k, top_p, min_p = _random_filters(rng, B, V)
    got = np.asarray(jax.jit(sampling.keep_mask)(jnp.asarray(logits), temperature, top_k, top_p, min_p))
    for b in range(B):
        scores = torch.from_numpy(logits[b:b + 1].copy())
        warpers = [lp.TemperatureLogitsWarper(float(temperature[b]))]
        if 0 < int(top_k[b]) < V:
            warpers.append(lp.TopKLogitsWarper(int(top_k[b])))
        if float(top_p[b]) < 1:
            warpers.append(lp.TopPLogitsWarper(float(top_p[b])))
        if float(min_p[b]) > 0:
            warpers.append(lp.MinPLogitsWarper(float(min_p[b])))
        for w in warpers:
            scores = w(None, scores)
        np.testing.assert_array_equal(got[b], torch.isfinite(scores)[0].numpy(), err_msg=f"row {b}")
