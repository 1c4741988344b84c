"""The paged-attention reference against plain per-sequence attention in numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.testing import numpy_attention
from pallas_kernels.paged_attention_reference import ragged_paged_attention_reference, write_kv


@pytest.mark.parametrize("q_block", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 5])
def test_ragged_batch_of_decode_chunk_and_full_prefill(window, q_block):
    rng = np.random.default_rng(0)
    N, K, H, page, P, max_pages = 4, 2, 8, 4, 32, 6
    seq_lens = [9, 17, 6]  # total tokens in the cache after this step
    q_lens = [1, 5, 6]  # a decode, a chunk in the middle, a whole prompt
    kv = [rng.standard_normal((n, K, H)).astype(np.float32) for n in seq_lens]
    vv = [rng.standard_normal((n, K, H)).astype(np.float32) for n in seq_lens]
    free_pages = list(rng.permutation(np.arange(1, P)))  # scattered pages, never the null page 0
    page_table = np.zeros((4, max_pages), np.int32)  # one padding row
    for s, n in enumerate(seq_lens):
        for j in range(-(-n // page)):
            page_table[s, j] = free_pages.pop()
    k_pages = jnp.zeros((P, page, K, H)); v_pages = jnp.zeros((P, page, K, H))
    # Write every token's K/V through write_kv (as the runner does: the old ones in earlier steps).
    slots = np.concatenate([[page_table[s, j // page] * page + j % page for j in range(n)]
                            for s, n in enumerate(seq_lens)]).astype(np.int32)
    k_pages, v_pages = write_kv(k_pages, v_pages, jnp.concatenate(kv), jnp.concatenate(vv), jnp.asarray(slots))

    T = 16  # padded token bucket
    q = np.zeros((T, N, H), np.float32)
    cu = np.zeros(5, np.int32)
    cu[1:4] = np.cumsum(q_lens)
    cu[4] = cu[3]
    qs = [rng.standard_normal((ql, N, H)).astype(np.float32) for ql in q_lens]
    q[: cu[3]] = np.concatenate(qs)
    out = ragged_paged_attention_reference(jnp.asarray(q), k_pages, v_pages,
                                           jnp.asarray(seq_lens + [0], jnp.int32), jnp.asarray(page_table),
                                           jnp.asarray(cu), jnp.int32(3), sliding_window=window,
                                           q_block=q_block)
    out = np.asarray(out)
    for s, (n, ql) in enumerate(zip(seq_lens, q_lens)):
        want = numpy_attention(qs[s], kv[s], vv[s], range(n - ql, n), window)
        np.testing.assert_allclose(out[cu[s]:cu[s + 1]], want, atol=1e-5, rtol=1e-5)
    assert not out[cu[3]:].any(), "padding tokens produce zeros"


def test_write_kv_puts_tokens_in_their_slots():
    k_pages = jnp.zeros((3, 2, 1, 2))
    k = jnp.arange(6, dtype=jnp.float32).reshape(3, 1, 2)
    new_k, _ = write_kv(k_pages, k_pages, k, k, jnp.asarray([5, 2, 0], jnp.int32))
    new_k = np.asarray(new_k)
    np.testing.assert_array_equal(new_k[2, 1, 0], [0, 1])  # slot 5 = page 2, offset 1
    np.testing.assert_array_equal(new_k[1, 0, 0], [2, 3])  # slot 2 = page 1, offset 0
    assert not new_k[1, 1].any() and not new_k[0, 1].any()


def test_stacked_cache_read_and_written_at_a_layer():
    """With `layer`, write and read address one layer of an [L, ...] cache and leave the others."""
    rng = np.random.default_rng(2)
    L, P, page, K, H, N = 3, 8, 4, 1, 8, 2
    k = jnp.asarray(rng.standard_normal((6, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((6, K, H)), jnp.float32)
    slots = jnp.asarray([4 * 5 + i for i in range(4)] + [4 * 2, 4 * 2 + 1], jnp.int32)  # pages 5, 2
    zeros = jnp.zeros((L, P, page, K, H))
    kc, vc = write_kv(zeros, zeros, k, v, slots, layer=1)
    assert not np.asarray(kc)[[0, 2]].any()
    q = jnp.asarray(rng.standard_normal((8, N, H)), jnp.float32)
    args = (jnp.asarray([6], jnp.int32), jnp.asarray([[5, 2]], jnp.int32), jnp.asarray([0, 6], jnp.int32),
            jnp.int32(1))
    got = ragged_paged_attention_reference(q, kc, vc, *args, layer=1, q_block=4)
    want = numpy_attention(np.asarray(q[:6]), np.asarray(k), np.asarray(v), range(6))
    np.testing.assert_allclose(np.asarray(got[:6]), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pages_per_item", [1, 3])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_by_page_items_matches_numpy(window, pages_per_item):
    from pallas_kernels.paged_attention_reference import decode_attention_by_pages, decode_items

    rng = np.random.default_rng(3)
    N, K, H, page, P = 6, 2, 8, 4, 40
    seq_lens = [1, 3, 4, 5, 17, 9]
    free = list(rng.permutation(np.arange(1, P)))
    page_table = np.zeros((8, 6), np.int32)  # two padding sequences
    kv = [rng.standard_normal((n, K, H)).astype(np.float32) for n in seq_lens]
    vv = [rng.standard_normal((n, K, H)).astype(np.float32) for n in seq_lens]
    k_pages = np.zeros((P, page, K, H), np.float32)
    v_pages = np.zeros((P, page, K, H), np.float32)
    for s, n in enumerate(seq_lens):
        for j in range(-(-n // page)):
            page_table[s, j] = free.pop()
        for t in range(n):
            k_pages[page_table[s, t // page], t % page] = kv[s][t]
            v_pages[page_table[s, t // page], t % page] = vv[s][t]
    kv_lens = np.array(seq_lens + [0, 0], np.int32)
    q = rng.standard_normal((8, N, H)).astype(np.float32)
    items = decode_items(kv_lens, page_table, page, 32, pages_per_item)
    out = np.asarray(decode_attention_by_pages(jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages),
                                               jnp.asarray(kv_lens), *map(jnp.asarray, items),
                                               sliding_window=window))
    for s, n in enumerate(seq_lens):
        want = numpy_attention(q[s:s + 1], kv[s], vv[s], [n - 1], window)
        np.testing.assert_allclose(out[s:s + 1], want, atol=1e-5, rtol=1e-5)
    assert not out[6:].any()
    with pytest.raises(ValueError, match="exceed"):
        decode_items(kv_lens, page_table, page, 4, pages_per_item)
