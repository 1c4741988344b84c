"""The Pallas TPU ragged paged-attention kernel against the jnp reference, run in the TPU
interpreter on CPU (with NaN in every slot the kernel must not weigh), plus a race check and a
Mosaic lowering check that need no TPU.

The parameter sets cover each batch kind, GQA ratio (1, 3, 4, 8), head dim (64, 128), dtype,
cache layout, window, soft cap and block size at least once, rather than their full product.
8-bit pages are checked against the reference reading the same `QuantizedPages`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as mosaic_interpret
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import ops
from pallas_kernels.kv_quant import QuantizedPages
from pallas_kernels.ragged_paged_attention_tpu import padded_group, ragged_paged_attention_tpu
from tests.pallas_kernels.cases import BATCHES, check_close, make_case, quantized

F32, BF16 = jnp.float32, jnp.bfloat16

# (batch, N, K, H, dtype, stacked cache, kernel options): GQA ratio N // K.
CASES = [
    ("decode", 4, 4, 64, F32, True, dict()),
    ("decode", 8, 1, 128, BF16, False, dict(q_block=1, pages_per_block=2)),
    ("decode", 3, 1, 64, F32, True, dict(sliding_window=8, soft_cap=1.5)),
    ("prefill", 6, 2, 64, F32, True, dict(sliding_window=5)),
    ("prefill", 8, 2, 128, F32, True, dict(soft_cap=1.5, q_block=4, pages_per_block=1)),
    ("prefill", 8, 1, 64, BF16, True, dict(sm_scale=0.3)),
    ("prefill", 2, 2, 128, F32, False, dict(pages_per_block=8)),  # one compute block per sequence
    ("mixed", 8, 2, 64, BF16, True, dict(sliding_window=7, soft_cap=1.5, pages_per_block=2)),
    ("mixed", 16, 2, 128, F32, False, dict(q_block=16)),
    ("mixed", 2, 2, 128, BF16, True, dict(sliding_window=3)),
    ("mixed", 12, 4, 64, F32, True, dict(q_block=2, pages_per_block=3)),  # Gp 4 > G 3
    ("mixed", 4, 1, 128, F32, True, dict(sliding_window=1)),  # every query sees only itself
]


def _reference_options(options):
    return {k: v for k, v in options.items() if k in ("sliding_window", "soft_cap", "sm_scale")}


@pytest.mark.parametrize("batch, N, K, H, dtype, stacked, options", CASES)
def test_matches_reference(batch, N, K, H, dtype, stacked, options):
    case = make_case(**BATCHES[batch], num_heads=N, num_kv_heads=K, head_dim=H, dtype=dtype)
    if stacked:
        caches, layer = (case.k_cache, case.v_cache), jnp.int32(case.layer)  # traced layer
    else:
        caches, layer = (case.k_cache[case.layer], case.v_cache[case.layer]), None
    args = (case.q, *caches, *case.args()[3:])
    got = ragged_paged_attention_tpu(*args, layer=layer, interpret=True, **options)
    assert got.shape == case.q.shape and got.dtype == dtype
    check_close(got, case, case.reference(**_reference_options(options)), dtype)


# 8-bit pages: (batch, N, K, H, dtype, stacked cache, kv_cache_dtype, kernel options)
KV8_CASES = [
    ("mixed", 4, 2, 64, F32, True, "int8", dict(pages_per_block=2)),
    ("mixed", 8, 1, 128, BF16, True, "int8", dict(sliding_window=5, soft_cap=1.5, q_block=4)),
    ("mixed", 4, 2, 64, F32, False, "fp8", dict(sliding_window=7, pages_per_block=3)),
]


@pytest.mark.parametrize("batch, N, K, H, dtype, stacked, kv_cache_dtype, options", KV8_CASES)
def test_8bit_pages_match_reference(batch, N, K, H, dtype, stacked, kv_cache_dtype, options):
    case = quantized(make_case(**BATCHES[batch], num_heads=N, num_kv_heads=K, head_dim=H, dtype=dtype),
                     kv_cache_dtype)
    k, v = (case.k_cache, case.v_cache) if stacked else case.layer_caches()
    got = ragged_paged_attention_tpu(case.q, k.values, v.values, *case.args()[3:],
                                     layer=jnp.int32(case.layer) if stacked else None, k_scale=k.scale,
                                     v_scale=v.scale, interpret=True, **options)
    assert got.shape == case.q.shape and got.dtype == dtype
    check_close(got, case, case.reference(**_reference_options(options)), dtype)


def test_ops_hands_8bit_pages_to_the_kernel():
    """`ops.ragged_paged_attention` with QuantizedPages on the pallas_tpu backend: values and scales
    reach the kernel (interpreted off TPU), which gives the reference's answer."""
    case = quantized(make_case(q_lens=[1, 6], kv_lens=[5, 6], num_heads=2, num_kv_heads=1, head_dim=128), "int8")
    got = ops.ragged_paged_attention(*case.args(), layer=case.layer, q_block=8, backend="pallas_tpu")
    check_close(got, case, case.reference(), F32)


def test_junk_page_table_entries_past_a_sequence_are_not_read():
    case = make_case(**BATCHES["mixed"], num_heads=4, num_kv_heads=2, head_dim=64)
    table = np.asarray(case.page_table)
    junk = np.where(table == 0, np.int32(10**6), table)  # out of the pool: a fault if copied
    junk[:, -1] = -7
    got = ragged_paged_attention_tpu(case.q, case.k_cache, case.v_cache, case.kv_lens, jnp.asarray(junk),
                                     case.cu_q_lens, case.num_seqs, layer=case.layer, interpret=True)
    check_close(got, case, case.reference(), F32)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_no_races_between_copies_and_compute(kv_cache_dtype):
    case = make_case(q_lens=[1, 9], kv_lens=[6, 13], num_heads=4, num_kv_heads=2, head_dim=64)
    scales = {}
    if kv_cache_dtype != "auto":  # 8-bit pages: the scales' copies share the slots with the values'
        case = quantized(case, kv_cache_dtype)
        scales = dict(k_scale=case.k_cache.scale, v_scale=case.v_cache.scale)
    k, v = (x.values if scales else x for x in (case.k_cache, case.v_cache))
    params = pltpu.InterpretParams(detect_races=True)
    got = ragged_paged_attention_tpu(case.q, k, v, *case.args()[3:], layer=case.layer, pages_per_block=1,
                                     interpret=params, **scales)
    check_close(got, case, case.reference(), F32)
    assert not mosaic_interpret.races.races_found


def test_race_detector_flags_a_read_before_the_copy_is_waited():
    """The detector the test above relies on does report a race (a guard against a vacuous check)."""

    def racy_kernel(x_hbm_ref, o_ref, buf, sem):
        copy = pltpu.make_async_copy(x_hbm_ref, buf, sem)
        copy.start()
        o_ref[...] = buf[...]  # reads the destination while the copy may still write it
        copy.wait()

    x = jnp.ones((8, 128), F32)
    pl.pallas_call(racy_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                   in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
                   scratch_shapes=[pltpu.VMEM(x.shape, x.dtype), pltpu.SemaphoreType.DMA(())],
                   interpret=pltpu.InterpretParams(detect_races=True))(x).block_until_ready()
    assert mosaic_interpret.races.races_found


@pytest.mark.parametrize("dtype, stacked, options", [
    (F32, True, dict()),
    (BF16, False, dict(sliding_window=5, soft_cap=30.0, q_block=16, pages_per_block=2)),
])
def test_lowers_to_mosaic_for_tpu(dtype, stacked, options):
    """Lowering the real (not interpreted) kernel runs the Pallas-to-Mosaic rules on CPU; Mosaic's
    own compilation happens on a TPU and is not covered."""
    case = make_case(**BATCHES["mixed"], num_heads=8, num_kv_heads=2, head_dim=128, dtype=dtype)
    k_cache, v_cache = (case.k_cache, case.v_cache) if stacked else (case.k_cache[1], case.v_cache[1])
    layer = jnp.int32(case.layer) if stacked else None  # traced: an argument of the jitted function

    def attention(q, k_cache, v_cache, kv_lens, page_table, cu_q_lens, num_seqs, layer):
        return ragged_paged_attention_tpu(q, k_cache, v_cache, kv_lens, page_table, cu_q_lens, num_seqs, layer=layer,
                                          **options)

    args = (case.q, k_cache, v_cache, *case.args()[3:], layer)
    lowered = jax.jit(attention).trace(*args).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()


@pytest.mark.parametrize("kv_cache_dtype, dtype", [("int8", BF16), ("fp8", F32)])
def test_8bit_pages_lower_to_mosaic_for_tpu(kv_cache_dtype, dtype):
    """As above, with 8-bit values and their scales (copied and converted in the kernel)."""
    case = make_case(**BATCHES["mixed"], num_heads=8, num_kv_heads=2, head_dim=128, dtype=dtype)
    pages = QuantizedPages.zeros(case.k_cache.shape, kv_cache_dtype, dtype)

    def attention(q, values, scale, kv_lens, page_table, cu_q_lens, num_seqs, layer):
        return ragged_paged_attention_tpu(q, values, values, kv_lens, page_table, cu_q_lens, num_seqs, layer=layer,
                                          k_scale=scale, v_scale=scale, sliding_window=5, q_block=16,
                                          pages_per_block=2)

    args = (case.q, pages.values, pages.scale, *case.args()[3:], jnp.int32(case.layer))
    lowered = jax.jit(attention).trace(*args).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()


@pytest.mark.parametrize("group, q_block, expected", [(1, 8, 1), (3, 8, 3), (1, 1, 8), (3, 2, 4), (8, 1, 8)])
def test_padded_group_fills_sublanes(group, q_block, expected):
    assert padded_group(group, q_block) == expected


def test_rejects_mismatched_heads():
    case = make_case(**BATCHES["decode"], num_heads=3, num_kv_heads=2, head_dim=64)
    with pytest.raises(ValueError, match="does not fit"):
        ragged_paged_attention_tpu(*case.args(), layer=case.layer, interpret=True)


def test_window_is_data_one_kernel_serves_every_layer():
    """Under a scanned layer loop a layer's window is a traced scalar (`jaxinfer.model.NO_WINDOW` for
    global layers): read from SMEM, so one compiled kernel serves local and global layers."""
    from jaxinfer.model import NO_WINDOW

    case = make_case(**BATCHES["mixed"], num_heads=4, num_kv_heads=1, head_dim=64)
    run = jax.jit(lambda w: ragged_paged_attention_tpu(*case.args(), layer=case.layer, sliding_window=w, q_block=4,
                                                       interpret=True))
    for window, want_window in [(3, 3), (NO_WINDOW, None)]:
        check_close(run(jnp.int32(window)), case, case.reference(sliding_window=want_window), F32)
    assert run._cache_size() == 1
