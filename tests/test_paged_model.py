"""The model over the paged cache: ragged steps mixing prefill chunks and decodes give the logits
the dense reference gives for each sequence alone."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinfer.loader import build_model
from jaxinfer.paged_attention import PagedAttentionMeta, PagedKVCache, paged_attend
from jaxinfer.reference import ReferenceGenerator
from jaxinfer.testing import random_weights, tiny_config

PAGE = 4


@pytest.mark.parametrize("overrides", [dict(), dict(sliding_window=6, scan_layers=False)])
def test_ragged_paged_steps_match_dense_logits(overrides):
    cfg = tiny_config(**overrides)
    graphdef, params = build_model(cfg, random_weights(cfg))
    dense = ReferenceGenerator(cfg, graphdef, params)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (11, 3, 7)]
    expected = [dense.logits(p) for p in prompts]  # [n, V] each

    run_params = dense.params  # in the layout the runner uses (per-layer arrays when unrolled)
    attend = paged_attend

    @jax.jit
    def step(cache, tokens, positions, meta):
        model = nnx.merge(graphdef, run_params)
        return model(tokens, positions, cache, meta, attend)

    cache = PagedKVCache.zeros(num_layers=cfg.num_layers, num_pages=16, page_size=PAGE,
                               num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=jnp.float32)
    free = iter([9, 2, 14, 5, 7, 11, 3, 12, 1, 6])  # scattered pages
    tables = [[next(free) for _ in range(-(-len(p) // PAGE))] for p in prompts]
    computed = [0, 0, 0]
    # Step 1: chunks of 6, 3 (whole), 4; step 2: the rest of 0 and 2 in one ragged row.
    for plan in ([6, 3, 4], [5, 0, 3]):
        toks, pos, slots, cu, kv_lens, rows = [], [], [], [0], [], []
        for s, n in enumerate(plan):
            if n == 0:
                continue
            start = computed[s]
            for j in range(start, start + n):
                toks.append(prompts[s][j]); pos.append(j)
                slots.append(tables[s][j // PAGE] * PAGE + j % PAGE)
            cu.append(cu[-1] + n); kv_lens.append(start + n); rows.append(s)
        T = 16
        pad = T - len(toks)
        page_table = np.zeros((4, 3), np.int32)
        for r, s in enumerate(rows):
            page_table[r, :len(tables[s])] = tables[s]
        meta = PagedAttentionMeta(
            slot_mapping=jnp.asarray(slots + [0] * pad, jnp.int32),
            kv_lens=jnp.asarray(kv_lens + [0] * (4 - len(rows)), jnp.int32),
            page_table=jnp.asarray(page_table),
            cu_q_lens=jnp.asarray(cu + [cu[-1]] * (5 - len(cu)), jnp.int32),
            num_seqs=jnp.int32(len(rows)))
        logits, cache = step(cache, jnp.asarray([toks + [0] * pad], jnp.int32),
                             jnp.asarray([pos + [0] * pad], jnp.int32), meta)
        logits = np.asarray(logits[0])
        for r, s in enumerate(rows):
            start = computed[s]
            got = logits[cu[r]:cu[r + 1]]
            np.testing.assert_allclose(got, expected[s][start:start + plan[s]], atol=2e-5, rtol=1e-5)
            computed[s] += plan[s]
    assert computed == [len(p) for p in prompts]
