"""The GPU (Triton) ragged paged-attention kernel against the jnp reference.

On CPU the kernel runs with interpret=True; the `gpu`-marked tests compile it for a real GPU.
Pages are randomly permuted and everything outside the sequences is NaN (tests/pallas_kernels/cases.py).
8-bit pages are checked against the reference reading the same `QuantizedPages`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import ops
from pallas_kernels.ragged_paged_attention_gpu import choose_num_splits, padded_group, ragged_paged_attention_gpu
from tests.pallas_kernels.cases import BATCHES, PAGE, check_close, make_case, quantized

# (batch, N, K, H, dtype, window, soft_cap, q_block, num_splits): every value of every axis at least once.
CASES = [
    ("decode", 4, 4, 64, jnp.float32, None, None, 1, 1),  # GQA 1
    ("decode", 24, 8, 128, jnp.bfloat16, None, None, 1, None),  # GQA 3, splits chosen
    ("decode", 8, 2, 64, jnp.float32, 6, 30.0, 1, 3),  # window + soft-cap, uneven splits
    ("prefill", 8, 1, 128, jnp.float32, None, None, 16, 1),  # GQA 8
    ("prefill", 6, 2, 64, jnp.bfloat16, 5, None, 8, 2),
    ("prefill", 4, 1, 64, jnp.float32, None, 20.0, 4, 1),  # GQA 4
    ("mixed", 8, 2, 128, jnp.float32, None, None, 8, 2),
    ("mixed", 12, 4, 64, jnp.float32, 7, 25.0, 16, 1),
    ("mixed", 4, 4, 128, jnp.bfloat16, None, None, 4, 4),
]


def _run(batch, N, K, H, dtype, window, soft_cap, q_block, num_splits, *, interpret, seed=0):
    case = make_case(**BATCHES[batch], num_heads=N, num_kv_heads=K, head_dim=H, dtype=dtype, seed=seed)
    got = ragged_paged_attention_gpu(*case.args(), layer=case.layer, sliding_window=window, soft_cap=soft_cap,
                                     q_block=q_block, block_kv=4 * PAGE, num_splits=num_splits, interpret=interpret)
    check_close(got, case, case.reference(sliding_window=window, soft_cap=soft_cap), dtype)


@pytest.mark.parametrize("params", CASES, ids=lambda p: "-".join(map(str, p[:4])))
def test_interpret_matches_reference(params):
    _run(*params, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("params", CASES, ids=lambda p: "-".join(map(str, p[:4])))
def test_gpu_matches_reference(params):
    _run(*params, interpret=False, seed=1)


# 8-bit pages: (batch, N, K, H, dtype, window, soft_cap, q_block, num_splits, stacked cache, kv_cache_dtype)
KV8_CASES = [
    ("mixed", 8, 2, 64, jnp.float32, None, None, 8, 1, True, "int8"),
    ("mixed", 4, 1, 128, jnp.bfloat16, 5, 20.0, 4, 2, True, "int8"),
    ("mixed", 12, 4, 64, jnp.float32, 7, None, 16, 3, False, "fp8"),
    ("decode", 8, 2, 64, jnp.bfloat16, None, None, 1, None, True, "fp8"),
]


def _run_kv8(batch, N, K, H, dtype, window, soft_cap, q_block, num_splits, stacked, kv_cache_dtype, *, interpret):
    case = quantized(make_case(**BATCHES[batch], num_heads=N, num_kv_heads=K, head_dim=H, dtype=dtype),
                     kv_cache_dtype)
    k, v = (case.k_cache, case.v_cache) if stacked else case.layer_caches()
    layer = case.layer if stacked else None
    got = ragged_paged_attention_gpu(case.q, k.values, v.values, *case.args()[3:], layer=layer, sliding_window=window,
                                     soft_cap=soft_cap, q_block=q_block, block_kv=4 * PAGE, num_splits=num_splits,
                                     interpret=interpret, k_scale=k.scale, v_scale=v.scale)
    check_close(got, case, case.reference(sliding_window=window, soft_cap=soft_cap), dtype)


@pytest.mark.parametrize("params", KV8_CASES, ids=lambda p: "-".join(map(str, (*p[:4], p[-1]))))
def test_interpret_8bit_pages_match_reference(params):
    _run_kv8(*params, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("params", KV8_CASES, ids=lambda p: "-".join(map(str, (*p[:4], p[-1]))))
def test_gpu_8bit_pages_match_reference(params):
    _run_kv8(*params, interpret=False)


def test_rejects_8bit_values_without_both_scales():
    case = quantized(make_case(**BATCHES["decode"], num_heads=4, num_kv_heads=4, head_dim=64), "int8")
    with pytest.raises(ValueError, match="8-bit caches need both scales"):
        ragged_paged_attention_gpu(case.q, case.k_cache.values, case.v_cache.values, *case.args()[3:],
                                   layer=case.layer, k_scale=case.k_cache.scale, interpret=True)


def test_ops_hands_8bit_pages_to_the_kernel():
    """`ops.ragged_paged_attention` with QuantizedPages on the pallas_gpu backend: values and scales
    reach the kernel, which gives the reference's answer."""
    case = quantized(make_case(**BATCHES["mixed"], num_heads=4, num_kv_heads=2, head_dim=64), "int8")
    got = ops.ragged_paged_attention(*case.args(), layer=jnp.int32(case.layer), q_block=8, backend="pallas_gpu")
    check_close(got, case, case.reference(), jnp.float32)


@pytest.mark.gpu
def test_gpu_long_context_default_blocks():
    """Default block sizes over 2k-token contexts (several key blocks per split)."""
    case = make_case(q_lens=[1, 40, 1, 200], kv_lens=[2047, 900, 2048, 1500], num_heads=32, num_kv_heads=8,
                     head_dim=128, page_size=16, dtype=jnp.bfloat16)
    got = ragged_paged_attention_gpu(*case.args(), layer=case.layer, q_block=16)
    check_close(got, case, case.reference(q_block=16), jnp.bfloat16)


def test_block_geometry():
    assert padded_group(1, 4) == 16 and padded_group(16, 3) == 4 and padded_group(4, 8) == 8
    assert choose_num_splits(programs=512, max_kv_blocks=32) == 2
    assert choose_num_splits(programs=8, max_kv_blocks=16) == 16  # capped by the key blocks
    assert choose_num_splits(programs=4096, max_kv_blocks=64) == 1


def test_rejects_bad_head_layout():
    case = make_case(**BATCHES["decode"], num_heads=6, num_kv_heads=4, head_dim=64)
    with pytest.raises(ValueError, match="multiple of 4 KV heads"):
        ragged_paged_attention_gpu(*case.args(), layer=case.layer, interpret=True)
    case = make_case(**BATCHES["decode"], num_heads=4, num_kv_heads=4, head_dim=48)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        ragged_paged_attention_gpu(*case.args(), layer=case.layer, interpret=True)
    case = make_case(**BATCHES["decode"], num_heads=4, num_kv_heads=4, head_dim=64)
    with pytest.raises(ValueError, match="block_kv must be a power of two >= 16"):
        ragged_paged_attention_gpu(*case.args(), layer=case.layer, block_kv=8, interpret=True)


def test_window_is_data_one_kernel_serves_every_layer():
    """Under a scanned layer loop a layer's window is a traced scalar (`jaxinfer.model.NO_WINDOW` for
    global layers): one compiled kernel, each call masking by the value it is handed."""
    from jaxinfer.model import NO_WINDOW

    case = make_case(**BATCHES["mixed"], num_heads=4, num_kv_heads=1, head_dim=64)
    run = jax.jit(lambda w: ragged_paged_attention_gpu(*case.args(), layer=case.layer, sliding_window=w, q_block=4,
                                                       block_kv=4 * PAGE, interpret=True))
    for window, want_window in [(3, 3), (NO_WINDOW, None), (6, 6)]:
        check_close(run(jnp.int32(window)), case, case.reference(sliding_window=want_window), jnp.float32)
    assert run._cache_size() == 1


def test_engine_with_int8_pages_gives_the_reference_tokens(tmp_path, monkeypatch):
    """The tiny model with kv_cache_dtype="int8": attention_backend="pallas_gpu" (the kernel reading
    the 8-bit pages, interpret mode on CPU) gives the reference backend's greedy tokens."""
    from jaxinfer.loader import load_model
    from jaxinfer.sampling_params import SamplingParams
    from jaxinfer.testing import tiny_gguf
    from jaxinfer.testing.engine import make_engine, random_prompts, run
    from pallas_kernels import ragged_paged_attention_gpu as gpu_module

    tiny_gguf(tmp_path / "tiny.gguf", head_dim=32, hidden_size=64, num_heads=2, num_kv_heads=1)
    model = load_model(str(tmp_path / "tiny.gguf"), progress=False)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    requests = {str(i): (p, params) for i, p in enumerate(random_prompts(model.config, (5, 9), seed=3))}
    want = run(make_engine(model, kv_cache_dtype="int8", attention_backend="reference"), requests)
    scaled = []
    kernel = gpu_module.ragged_paged_attention_gpu
    monkeypatch.setattr(gpu_module, "ragged_paged_attention_gpu",
                        lambda *a, **k: scaled.append(k["k_scale"] is not None) or kernel(*a, **k))
    got = run(make_engine(model, kv_cache_dtype="int8", attention_backend="pallas_gpu", max_num_seqs=2), requests)
    assert scaled and all(scaled)  # attention ran the kernel, on 8-bit pages
    for rid in requests:
        assert got[rid].outputs[0].token_ids == want[rid].outputs[0].token_ids


def test_fp8_pages_need_an_ada_or_later_gpu():
    """Triton converts float8 e4m3 from compute capability 8.9 on: fp8 pages on an older GPU's
    kernel are a typed refusal when the engine is built; int8 and the reference run anywhere."""
    import types

    a100, h100 = (types.SimpleNamespace(platform="gpu", compute_capability=cc) for cc in ("8.0", "9.0"))
    assert "compute capability >= 8.9" in ops.kv_cache_dtype_error("fp8", "pallas_gpu", a100)
    assert ops.kv_cache_dtype_error("fp8", "auto", a100) is not None
    assert ops.kv_cache_dtype_error("fp8", "pallas_gpu", h100) is None
    assert ops.kv_cache_dtype_error("int8", "pallas_gpu", a100) is None
    assert ops.kv_cache_dtype_error("fp8", "reference", a100) is None
    assert ops.kv_cache_dtype_error("fp8", "pallas_gpu", types.SimpleNamespace(platform="cpu")) is None
