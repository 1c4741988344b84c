"""Ragged paged-attention inputs shared by the kernel tests.

Every sequence's pages are drawn from a random permutation of the pool, and everything the
sequences do not own (unused pages, the null page 0, slots past a sequence's end) is NaN, so a
kernel that reads or weighs a slot it should not gives NaN instead of a small error. In an 8-bit
case (`quantized`) those slots' scales are NaN.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import ops
from pallas_kernels.kv_quant import QuantizedPages
from pallas_kernels.paged_attention_reference import ragged_paged_attention_reference


@dataclasses.dataclass
class Case:
    q: jnp.ndarray  # [T, N, H]
    k_cache: jnp.ndarray | QuantizedPages  # [L, P, page, K, H]
    v_cache: jnp.ndarray | QuantizedPages
    kv_lens: jnp.ndarray  # [S]
    page_table: jnp.ndarray  # [S, max_pages]
    cu_q_lens: jnp.ndarray  # [S + 1]
    num_seqs: jnp.ndarray  # []
    layer: int
    num_tokens: int  # real (unpadded) tokens

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.kv_lens, self.page_table, self.cu_q_lens, self.num_seqs)

    def reference(self, **kw):
        """The jnp reference in f32 on the same (possibly bf16-rounded) inputs, at full matmul
        precision: the exact answer a kernel is held to, whatever its own dtype (8-bit pages:
        dequantized to f32)."""
        def f32(x):
            if isinstance(x, QuantizedPages):
                return x.replace(compute_dtype=jnp.float32)
            return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x

        with jax.default_matmul_precision("highest"):
            return ragged_paged_attention_reference(*map(f32, self.args()), layer=self.layer, **kw)

    def layer_caches(self):
        """(k, v) of the read layer alone: [P, page, K, H] (for `layer=None`)."""
        return tuple(jax.tree.map(lambda x: x[self.layer], c) for c in (self.k_cache, self.v_cache))


def make_case(*, q_lens, kv_lens, num_heads, num_kv_heads, head_dim, page_size=4, dtype=jnp.float32, seed=0,
              num_layers=2, layer=1, pad_seqs=1, pad_tokens=3, spare_pages=3) -> Case:
    """A batch whose sequence s has kv_lens[s] tokens in the cache, the last q_lens[s] of them this
    step's queries. `pad_seqs` padding rows and `pad_tokens` padding tokens follow the real ones."""
    assert len(q_lens) == len(kv_lens) and all(0 < ql <= n for ql, n in zip(q_lens, kv_lens))
    rng = np.random.default_rng(seed)
    S = len(kv_lens) + pad_seqs
    pages_needed = [-(-n // page_size) for n in kv_lens]
    max_pages = max(pages_needed) + 1
    P = 1 + sum(pages_needed) + spare_pages
    L, K, H = num_layers, num_kv_heads, head_dim
    k_cache = np.full((L, P, page_size, K, H), np.nan, np.float32)
    v_cache = np.full((L, P, page_size, K, H), np.nan, np.float32)
    free = list(rng.permutation(np.arange(1, P)))
    page_table = np.zeros((S, max_pages), np.int32)
    for s, n in enumerate(kv_lens):
        for j in range(pages_needed[s]):
            page = free.pop()
            page_table[s, j] = page
            used = min(page_size, n - j * page_size)
            k_cache[:, page, :used] = rng.standard_normal((L, used, K, H))
            v_cache[:, page, :used] = rng.standard_normal((L, used, K, H))
    T = sum(q_lens) + pad_tokens
    q = np.zeros((T, num_heads, H), np.float32)
    q[: sum(q_lens)] = rng.standard_normal((sum(q_lens), num_heads, H))
    cu = np.zeros(S + 1, np.int32)
    cu[1:len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1:] = cu[len(q_lens)]
    lens = np.zeros(S, np.int32)
    lens[:len(kv_lens)] = kv_lens
    return Case(q=jnp.asarray(q, dtype), k_cache=jnp.asarray(k_cache, dtype), v_cache=jnp.asarray(v_cache, dtype),
                kv_lens=jnp.asarray(lens), page_table=jnp.asarray(page_table), cu_q_lens=jnp.asarray(cu),
                num_seqs=jnp.int32(len(kv_lens)), layer=layer, num_tokens=int(sum(q_lens)))


def quantized(case: Case, kv_cache_dtype: str) -> Case:
    """`case` with 8-bit pages: every slot's key and value written through `ops.write_kv` into
    `QuantizedPages.zeros`, then the scales of the slots the sequences do not own set to NaN."""
    L, P, page_size, K, H = case.k_cache.shape
    k_pages, v_pages = (QuantizedPages.zeros(case.k_cache.shape, kv_cache_dtype, case.q.dtype) for _ in range(2))
    slots = jnp.arange(P * page_size, dtype=jnp.int32)
    k, v = (jnp.nan_to_num(x).reshape(L, -1, K, H) for x in (case.k_cache, case.v_cache))
    for layer in range(L):
        k_pages, v_pages = ops.write_kv(k_pages, v_pages, k[layer], v[layer], slots, layer=layer)
    unowned = jnp.isnan(case.k_cache).any(-1).transpose(0, 1, 3, 2)[:, :, None]  # [L, P, 1, K, page] as the scales
    k_pages, v_pages = (x.replace(scale=jnp.where(unowned, jnp.nan, x.scale)) for x in (k_pages, v_pages))
    return dataclasses.replace(case, k_cache=k_pages, v_cache=v_pages)


def check_close(got, case: Case, want, dtype):
    """Real tokens within the dtype's tolerance (f32 2e-5, bf16 2e-2); padding tokens exactly 0."""
    tol = 2e-5 if jnp.dtype(dtype) == jnp.float32 else 2e-2
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    n = case.num_tokens
    assert np.isfinite(got[:n]).all(), "NaN from an unused slot reached the output"
    np.testing.assert_allclose(got[:n], want[:n], atol=tol, rtol=tol)
    assert not got[n:].any(), "padding tokens must come out as zeros"


# Batches of every kind (page_size 4): lengths 1, page-1, page, page+1 and long.
PAGE = 4
BATCHES = {
    "decode": dict(q_lens=[1, 1, 1, 1, 1], kv_lens=[1, PAGE - 1, PAGE, PAGE + 1, 37]),
    "prefill": dict(q_lens=[1, PAGE - 1, PAGE, PAGE + 1, 29], kv_lens=[1, PAGE - 1, PAGE, PAGE + 1, 29]),
    "mixed": dict(q_lens=[1, 6, PAGE, 1, 9], kv_lens=[PAGE + 1, 6, 2 * PAGE + 3, 37, 30]),
}
