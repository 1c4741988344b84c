"""Model invariants on tiny random models: scan == unroll, cache == full forward, GQA variants,
Qwen2 bias, sliding window, RoPE scaling."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.attention import DenseAttentionMeta, DenseKVCache, dense_attend
from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.layers import rope_inv_freq
from jaxinfer.loader import build_model
from jaxinfer.reference import ReferenceGenerator
from jaxinfer.sampling import SamplingParams
from jaxinfer.testing import numpy_attention, random_weights, tiny_config


def _generator(cfg: ModelConfig, seed: int = 0) -> ReferenceGenerator:
    graphdef, params = build_model(cfg, random_weights(cfg, seed))
    return ReferenceGenerator(cfg, graphdef, params)


def _tokens(cfg, n, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, n).tolist()


@pytest.mark.parametrize("overrides", [
    dict(),  # GQA
    dict(num_kv_heads=4),  # MHA
    dict(num_kv_heads=1),  # MQA
    dict(arch="qwen2", attention_bias=True, tie_word_embeddings=True),
    dict(sliding_window=5),
])
def test_scanned_and_unrolled_layers_give_the_same_logits(overrides):
    cfg = tiny_config(**overrides)
    tokens = _tokens(cfg, 13)
    scanned = _generator(cfg).logits(tokens)
    unrolled = _generator(dataclasses.replace(cfg, scan_layers=False)).logits(tokens)
    assert scanned.shape == (13, cfg.vocab_size)
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(num_kv_heads=1, scan_layers=False), dict(sliding_window=4)])
def test_cached_decoding_matches_full_forward(overrides):
    """Greedy tokens from prefill + cached decode steps == argmax of a fresh full forward each time."""
    cfg = tiny_config(**overrides)
    gen = _generator(cfg)
    prompt = _tokens(cfg, 7)
    out = gen.generate([prompt], [SamplingParams(max_tokens=10, temperature=0)])[0].token_ids
    seq = list(prompt)
    for token in out:
        assert int(gen.logits(seq)[-1].argmax()) == token
        seq.append(token)


def test_batched_generation_equals_one_by_one():
    cfg = tiny_config()
    gen = _generator(cfg)
    prompts = [_tokens(cfg, n, seed=n) for n in (3, 17, 9)]
    params = [SamplingParams(max_tokens=m, temperature=0) for m in (5, 8, 12)]
    together = gen.generate(prompts, params)
    for p, sp, got in zip(prompts, params, together):
        alone = gen.generate([p], [sp])[0]
        assert got.token_ids == alone.token_ids
        assert len(got.token_ids) == sp.max_tokens and got.finish_reason == "length"


@pytest.mark.parametrize("window", [None, 3])
def test_dense_attention_matches_numpy(window):
    rng = np.random.default_rng(0)
    T, N, K, H, S = 9, 4, 2, 8, 16
    q, k, v = (rng.standard_normal((1, T, n, H)).astype(np.float32) for n in (N, K, K))
    cache = DenseKVCache.zeros(num_layers=2, batch_size=1, max_len=S, num_kv_heads=K, head_dim=H,
                               dtype=jnp.float32)
    meta = DenseAttentionMeta(start_pos=jnp.zeros((1,), jnp.int32))
    out, cache = dense_attend(q, k, v, cache, 1, meta, sliding_window=window)
    np.testing.assert_allclose(np.asarray(out[0]), numpy_attention(q[0], k[0], v[0], range(T), window), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.k[1, 0, :T]), k[0])
    assert not np.asarray(cache.k[0]).any(), "only the given layer is written"


def test_llama3_rope_scaling():
    base = rope_inv_freq(128, 500000.0, None)
    scaled = rope_inv_freq(128, 500000.0, RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=8192))
    wavelen = 2 * np.pi / base
    high = wavelen < 8192 / 4  # short wavelengths are kept
    low = wavelen > 8192 / 1  # long wavelengths are divided by the factor
    np.testing.assert_allclose(scaled[high], base[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], base[low] / 8.0, rtol=1e-6)
    mid = ~high & ~low
    assert mid.any() and np.all(scaled[mid] <= base[mid]) and np.all(scaled[mid] >= base[mid] / 8.0)
    # llama.cpp stores the same scaling as per-frequency divisors.
    factors = tuple((base / scaled).tolist())
    np.testing.assert_allclose(rope_inv_freq(128, 500000.0, None, factors), scaled, rtol=1e-6)


def test_parameters_carry_logical_axis_names():
    cfg = tiny_config()
    _, params = build_model(cfg, random_weights(cfg))
    from flax import nnx

    axes = {".".join(map(str, k)): v.get_metadata()["logical_axes"] for k, v in nnx.to_flat_state(params)}
    assert axes["layers.wq"] == ("layers", "embed", "heads", "head_dim")
    assert axes["layers.wk"][2] == "kv_heads" and axes["lm_head"] == ("embed", "vocab")
    for key, names in axes.items():
        assert len(names) == np.ndim(dict(nnx.to_flat_state(params))[tuple(key.split("."))].get_value())


def test_config_validation_says_what_to_change():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        tiny_config(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="arch"):
        tiny_config(arch="gpt-neox")
    with pytest.raises(ValueError, match="dtype"):
        tiny_config(dtype="int8")


def test_bfloat16_model_runs_and_tracks_float32():
    cfg = tiny_config()
    tokens = _tokens(cfg, 11)
    f32 = _generator(cfg).logits(tokens)
    bf16 = _generator(dataclasses.replace(cfg, dtype="bfloat16")).logits(tokens)
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    assert np.abs(bf16 - f32).max() < 0.1 * np.abs(f32).max()


def test_num_params_matches_the_weights():
    for cfg in (tiny_config(), tiny_config(tie_word_embeddings=True, attention_bias=True, arch="qwen2")):
        assert cfg.num_params() == sum(w.size for w in random_weights(cfg).values())


def test_unrolled_loop_over_stacked_or_unstacked_layers_agrees():
    from flax import nnx

    from jaxinfer.attention import DenseAttentionMeta, DenseKVCache, dense_attend
    from jaxinfer.model import unstack_layers

    cfg = tiny_config(scan_layers=False)
    graphdef, params = build_model(cfg, random_weights(cfg))
    unstacked = unstack_layers(params)
    wq = dict(nnx.to_flat_state(unstacked))[("layers", "wq")].get_value()
    assert isinstance(wq, tuple) and len(wq) == cfg.num_layers and wq[1].shape == (64, 4, 16)
    # the original state is untouched
    assert dict(nnx.to_flat_state(params))[("layers", "wq")].get_value().shape == (2, 64, 4, 16)
    tokens = jnp.asarray([_tokens(cfg, 9)], jnp.int32)
    positions = jnp.arange(9, dtype=jnp.int32)[None]
    outs = []
    for state in (params, unstacked):
        cache = DenseKVCache.zeros(num_layers=2, batch_size=1, max_len=16, num_kv_heads=2, head_dim=16,
                                   dtype=jnp.float32)
        meta = DenseAttentionMeta(start_pos=jnp.zeros((1,), jnp.int32))
        logits, _ = nnx.merge(graphdef, state)(tokens, positions, cache, meta, dense_attend)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
