"""The native CPU decode attention (C++ through XLA's FFI) against the jnp reference
(`decode_attention_by_pages`) and a float64 numpy attention, and the property the engine relies on:
a row's output is computed with the same float operations whatever the other rows of the step or
the threads, so a verify step's positions equal bitwise decode steps of each alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention_cpu as native
from pallas_kernels import ops
from pallas_kernels.paged_attention_reference import decode_attention_by_pages, decode_items

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler to build the native kernel")


def _case(rng, *, lens, K, G, H, page_size, pages_per_item, L=None, nan_past_end=True):
    """Random pages for sequences of `lens` tokens (pages in shuffled order), their decode items."""
    S = len(lens)
    per_seq = max(1, max(-(-n // page_size) for n in lens))
    num_pages = S * per_seq + 5
    shape = (num_pages, page_size, K, H) if L is None else (L, num_pages, page_size, K, H)
    k = rng.normal(size=shape).astype(np.float32)
    v = rng.normal(size=shape).astype(np.float32)
    table = rng.permutation(np.arange(1, num_pages))[:S * per_seq].reshape(S, per_seq).astype(np.int32)
    if nan_past_end:  # slots past a sequence's end may hold anything: never read
        for s, n in enumerate(lens):
            for j in range(per_seq):
                for t in range(page_size):
                    if j * page_size + t >= n:
                        k[..., table[s, j], t, :, :] = np.nan
                        v[..., table[s, j], t, :, :] = np.nan
    groups = sum(-(-(-(-n // page_size)) // pages_per_item) for n in lens)
    items = decode_items(np.asarray(lens, np.int32), table, page_size, groups + 3, pages_per_item)
    q = rng.normal(size=(S, K * G, H)).astype(np.float32)
    return q, k, v, np.asarray(lens, np.int32), table, items


def _numpy_attention(q, k, v, lens, table, page_size, *, layer=None, window=None, sm_scale=None, soft_cap=None):
    """Float64 attention of each row's query over its first lens[s] positions."""
    S, N, H = q.shape
    if layer is not None:
        k, v = k[layer], v[layer]
    K = k.shape[-2]
    out = np.zeros((S, N, H))
    scale = H ** -0.5 if sm_scale is None else sm_scale
    for s, n in enumerate(lens):
        if n == 0:
            continue
        pos = np.arange(n)
        keys = k[table[s, pos // page_size], pos % page_size].astype(np.float64)  # [n, K, H]
        values = v[table[s, pos // page_size], pos % page_size].astype(np.float64)
        visible = pos > n - 1 - window if window else np.ones(n, bool)
        for head in range(N):
            kh = head // (N // K)
            logits = keys[:, kh] @ q[s, head].astype(np.float64) * scale
            if soft_cap:
                logits = soft_cap * np.tanh(logits / soft_cap)
            logits = np.where(visible, logits, -np.inf)
            p = np.exp(logits - logits.max())
            out[s, head] = p @ values[:, kh] / p.sum()
    return out


def _native(q, k, v, lens, items, **kw):
    return np.asarray(jax.jit(lambda q: native.decode_attention_cpu(q, k, v, lens, *items, **kw))(q))


@pytest.mark.parametrize("K, G, H", [(3, 3, 64), (1, 4, 256), (2, 1, 32), (1, 5, 64), (2, 8, 16), (1, 2, 36)])
@pytest.mark.parametrize("page_size, pages_per_item", [(16, 2), (8, 1), (4, 3)])
def test_native_matches_the_reference_and_float64(K, G, H, page_size, pages_per_item):
    """Head groups of 1-8 query heads per KV head (a block of 4 and a rest), head dims that are and
    are not a whole number of vectors, items of 1-3 pages, an empty row, rows ending mid-page."""
    rng = np.random.default_rng(K * 100 + G * 10 + H + page_size)
    q, k, v, lens, table, items = _case(rng, lens=[1, 37, 0, 100, 16], K=K, G=G, H=H, page_size=page_size,
                                        pages_per_item=pages_per_item, L=3)
    want = _numpy_attention(q, k, v, lens, table, page_size, layer=1)
    got = _native(q, k, v, lens, items, layer=jnp.int32(1))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    ref = np.asarray(decode_attention_by_pages(jnp.asarray(q), jnp.asarray(np.nan_to_num(k)),
                                               jnp.asarray(np.nan_to_num(v)), lens, *items, layer=1))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
    assert not np.any(got[2]), "a row without tokens attends to nothing"


@pytest.mark.parametrize("window", [5, 16, 40])
def test_sliding_window_soft_cap_and_scale(window):
    """Gemma's local layers (a window, as an int or as traced data) and logit soft-capping."""
    rng = np.random.default_rng(window)
    q, k, v, lens, table, items = _case(rng, lens=[3, 50, 33], K=1, G=4, H=64, page_size=16, pages_per_item=2)
    want = _numpy_attention(q, k, v, lens, table, 16, window=window, sm_scale=0.2, soft_cap=30.0)
    got = _native(q, k, v, lens, items, sliding_window=window, sm_scale=0.2, soft_cap=30.0)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    traced = np.asarray(jax.jit(lambda q, w: native.decode_attention_cpu(q, k, v, lens, *items, sliding_window=w,
                                                                          sm_scale=0.2, soft_cap=30.0))(
        q, jnp.int32(window)))
    np.testing.assert_array_equal(traced, got)


def test_each_row_is_computed_as_it_would_be_alone(monkeypatch):
    """A verify step's rows (one sequence at positions p, p + 1, ...) next to other sequences give
    bitwise what each row gives in a step of its own, on one thread or two."""
    rng = np.random.default_rng(3)
    page_size, ppi = 16, 2
    q, k, v, _, table, _ = _case(rng, lens=[200, 90], K=3, G=3, H=64, page_size=page_size, pages_per_item=ppi,
                                 nan_past_end=False)
    rows_lens = np.array([197, 198, 199, 200, 90, 61], np.int32)
    rows_table = table[[0, 0, 0, 0, 1, 1]]
    rows_q = rng.normal(size=(6, 9, 64)).astype(np.float32)

    def step(idx):
        items = decode_items(rows_lens[idx], rows_table[idx], page_size, 40, ppi)
        return _native(rows_q[idx], k, v, rows_lens[idx], items)

    alone = [step([i]) for i in range(6)]
    for threads in (1, 2):
        monkeypatch.setattr(native.quantized_matmul_cpu, "THREADS", threads)
        together = step(list(range(6)))
        for i in range(6):
            np.testing.assert_array_equal(together[i:i + 1], alone[i], err_msg=f"row {i}, {threads} threads")


def test_auto_takes_the_kernel_on_cpu_and_reference_the_jnp_code():
    rng = np.random.default_rng(5)
    q, k, v, lens, _, items = _case(rng, lens=[20], K=1, G=2, H=64, page_size=16, pages_per_item=2,
                                    nan_past_end=False)

    def lowered(backend):
        fn = lambda q: ops.decode_attention_by_pages(q, jnp.asarray(k), jnp.asarray(v), lens, *items,  # noqa: E731
                                                     backend=backend)
        return jax.jit(fn).lower(jnp.asarray(q)).as_text()

    assert native.TARGET in lowered("auto")
    assert native.TARGET not in lowered("reference")


def test_switched_off_auto_runs_the_reference(monkeypatch):
    """JAXINFER_NATIVE_ATTENTION=0 (or a failed build): "auto" keeps the jnp reference."""
    rng = np.random.default_rng(6)
    q, k, v, lens, _, items = _case(rng, lens=[20], K=1, G=2, H=64, page_size=16, pages_per_item=2,
                                    nan_past_end=False)
    native.available.cache_clear()
    try:
        monkeypatch.setenv("JAXINFER_NATIVE_ATTENTION", "0")
        assert not native.available()
        fn = lambda q: ops.decode_attention_by_pages(q, jnp.asarray(k), jnp.asarray(v), lens, *items)  # noqa: E731
        assert native.TARGET not in jax.jit(fn).lower(jnp.asarray(q)).as_text()
        with pytest.raises(RuntimeError, match="could not be built"):
            native.decode_attention_cpu(q, k, v, lens, *items)
    finally:
        native.available.cache_clear()
    monkeypatch.undo()
    assert native.available()


@pytest.mark.parametrize("window,soft_cap", [(None, None), (7, None), (None, 30.0)])
def test_a_ragged_step_runs_its_rows_as_decodes(window, soft_cap):
    """`ops.ragged_paged_attention` on CPU (a mixed step: a prompt chunk from position 0, a decode, a
    chunk continuing its sequence's earlier pages, padding rows) takes every query row as a decode
    on the kernel: the reference's query blocks over the page table give the same rows (float
    rounding apart), padding rows are zero, and a row's output does not depend on its chunk's split."""
    from pallas_kernels.paged_attention_reference import ragged_paged_attention_reference

    rng = np.random.default_rng(3)
    L, page_size, K, G, H = 2, 16, 3, 3, 64
    q_lens, kv_lens = [37, 1, 20], [37, 51, 50]  # chunk s's last row sits at kv_lens[s] - 1
    S, T, W = 4, 64, 8
    num_pages = 40
    k = rng.normal(size=(L, num_pages, page_size, K, H)).astype(np.float32)
    v = rng.normal(size=(L, num_pages, page_size, K, H)).astype(np.float32)
    table = np.zeros((S, W), np.int32)
    free = rng.permutation(np.arange(1, num_pages))
    for s, n in enumerate(kv_lens):
        table[s, :-(-n // page_size)] = free[s * W:s * W + -(-n // page_size)]
    cu = np.zeros(S + 1, np.int32)
    cu[1:4] = np.cumsum(q_lens)
    cu[4:] = cu[3]
    q = rng.normal(size=(T, K * G, H)).astype(np.float32)
    lens = np.asarray(kv_lens + [0], np.int32)
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lens), jnp.asarray(table), jnp.asarray(cu),
            jnp.int32(3))
    common = dict(layer=1, sliding_window=window, soft_cap=soft_cap)
    got = np.asarray(ops.ragged_paged_attention(*args, q_block=8, max_prefill_seqs=4, **common))
    want = np.asarray(ragged_paged_attention_reference(*args, q_block=8, max_prefill_seqs=4, sm_scale=H ** -0.5,
                                                       **common))
    n = cu[3]
    np.testing.assert_allclose(got[:n], want[:n], atol=2e-5, rtol=2e-5)
    assert not np.any(got[n:])
    # the first chunk split in two (17 rows, then 20 more at positions 17..36): the same rows, bitwise
    cu2 = np.asarray([0, 17, 37, 37, 37], np.int32)
    lens2 = np.asarray([17, 37, 0, 0], np.int32)
    table2 = np.stack([table[0], table[0], table[2], table[3]])
    split = ops.ragged_paged_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lens2),
                                       jnp.asarray(table2), jnp.asarray(cu2), jnp.int32(2), q_block=8,
                                       max_prefill_seqs=4, **common)
    np.testing.assert_array_equal(np.asarray(split)[:37], got[:37])


def _numpy_visible(q, k, v, table, page_size, visible):
    """Float64 attention of row s over the positions visible[s] (a list) of its pages."""
    S, N, H = q.shape
    K = k.shape[-2]
    out = np.zeros((S, N, H))
    for s, pos in enumerate(visible):
        pos = np.asarray(pos)
        keys = k[table[s, pos // page_size], pos % page_size].astype(np.float64)
        values = v[table[s, pos // page_size], pos % page_size].astype(np.float64)
        for head in range(N):
            logits = keys[:, head // (N // K)] @ q[s, head].astype(np.float64) * H ** -0.5
            p = np.exp(logits - logits.max())
            out[s, head] = p @ values[:, head // (N // K)] / p.sum()
    return out


@pytest.mark.parametrize("window", [None, 6])
def test_draft_tree_rows_see_their_ancestors_only(window):
    """A verify step's rows of a draft tree (`speculative.tree`): the request's last known token at
    position b = 40 and drafts a1 -> b1 (rows 1, 2) beside a2 (row 3, at slot b + 3 but position
    b + 1). Row r sees the positions before b and the rows its mask names; its sliding window ends
    at its own position (b + popcount - 1); rows with mask -1 are causal, bitwise as without masks."""
    rng = np.random.default_rng(11)
    b, page_size = 40, 8
    q, k, v, lens, table, items = _case(rng, lens=[b + 1, b + 2, b + 3, b + 4, 30], K=2, G=3, H=32,
                                        page_size=page_size, pages_per_item=2, nan_past_end=False)
    table[:4] = table[0]  # the step's four rows are one request's (its pages), the fifth another's
    items = decode_items(lens, table, page_size, 20, 2)
    base = np.asarray([b, b, b, b, 0], np.int32)
    mask = np.asarray([0b1, 0b11, 0b111, 0b1001, -1], np.int32)
    rows = [[0], [0, 1], [0, 1, 2], [0, 3]]
    own = [b + len(r) - 1 for r in rows]
    lo = [0 if window is None else p - window + 1 for p in own]
    visible = [[p for p in range(lo[s], b)] + [b + i for i in rows[s]] for s in range(4)]
    visible.append(list(range(0 if window is None else 30 - window, 30)))
    want = _numpy_visible(q, k, v, table, page_size, visible)
    kw = {} if window is None else dict(sliding_window=window)
    got = _native(q, k, v, lens, items, tree_base=base, tree_mask=mask, **kw)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    ref = np.asarray(decode_attention_by_pages(jnp.asarray(q), jnp.asarray(np.nan_to_num(k)),
                                               jnp.asarray(np.nan_to_num(v)), lens, *items, tree_base=base,
                                               tree_mask=mask, **kw))
    np.testing.assert_allclose(ref, want, rtol=2e-5, atol=2e-5)
    causal = np.asarray([-1] * 5, np.int32)  # every row causal: as without masks, bit for bit
    np.testing.assert_array_equal(_native(q, k, v, lens, items, tree_base=base, tree_mask=causal, **kw),
                                  _native(q, k, v, lens, items, **kw))
