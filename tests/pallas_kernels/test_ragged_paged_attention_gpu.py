"""The GPU (Triton) ragged paged-attention kernel against the jnp reference.

On CPU the kernel runs with interpret=True; the `gpu`-marked tests compile it for a real GPU.
Pages are randomly permuted and everything outside the sequences is NaN (tests/pallas_kernels/cases.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.ragged_paged_attention_gpu import choose_num_splits, padded_group, ragged_paged_attention_gpu
from tests.pallas_kernels.cases import BATCHES, PAGE, check_close, make_case

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
