"""Draft trees (`jaxinfer.speculative.tree`): the paths a config names are checked, the accepted path
is the one whose every node equals the target's token at its parent's row, rows see their
ancestors only, and a backend that cannot mask rows is refused."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import InvalidRequestError
from jaxinfer.speculative import SpeculativeConfig, tree

T1 = [[0], [0, 0], [1]]  # t0 -> a1 -> b1, t0 -> a2


def test_paths_parents_depths_and_row_masks():
    paths = tree.paths_of(T1, 3)
    assert paths == ((0,), (0, 0), (1,))
    assert tree.parents_of(paths) == (-1, 0, -1)
    assert tree.depths((-1, 0, -1)) == [1, 2, 1]
    # rows t0, a1, b1, a2: t0 sees itself; a1 t0 and itself; b1 t0, a1, itself; a2 t0 and itself
    assert tree.row_masks((-1, 0, -1)) == [0b1, 0b11, 0b111, 0b1001]
    assert tree.chain(3) == (-1, 0, 1)
    assert tree.row_masks(tree.chain(3)) == [0b1, 0b11, 0b111, 0b1111]  # a chain is causal


def test_trim_keeps_nodes_up_to_a_depth_with_their_parents_reindexed():
    assert tree.trim([5, 6, 7], (-1, 0, -1), 1) == ((5, 7), (-1, -1))
    assert tree.trim([5, 6, 7], (-1, 0, -1), 2) == ((5, 6, 7), (-1, 0, -1))
    assert tree.trim([1, 2, 3, 4, 5], (-1, -1, 0, -1, 1), 1) == ((1, 2, 4), (-1, -1, -1))


@pytest.mark.parametrize("value,why", [
    ([], "non-empty list"), ([[0], [0]], "twice"), ([[0, 0], [0]], "before its parent"),
    ([[0], [2]], "no sibling of rank 1"), ([[0], [-1]], "ranks >= 0"), ([[0], [0, 0]], "2 nodes"),
    ("[[0]]", "non-empty list")])
def test_bad_trees_are_typed_errors_that_say_what_to_change(value, why):
    with pytest.raises(InvalidRequestError, match=why):
        SpeculativeConfig(method="eagle", model="head", num_speculative_tokens=3, draft_tree=value)


def test_only_eagle_proposes_trees():
    with pytest.raises(InvalidRequestError, match='method \\\\"eagle\\\\"|method "eagle"'):
        SpeculativeConfig(method="ngram", num_speculative_tokens=3, draft_tree=T1)
    spec = SpeculativeConfig.of({"method": "eagle", "model": "head", "num_speculative_tokens": 3, "draft_tree": T1})
    assert spec.draft_tree == ((0,), (0, 0), (1,))  # (JSON lists become a hashable tuple)
    hash(spec)


def test_accept_follows_the_path_whose_tokens_the_target_chose():
    """Rows [t0, a1, b1, a2] with drafts a1 = 10, b1 = 11, a2 = 20; the target's token at each row
    (after t0, after a1, after b1, after a2) decides, by hand."""
    drafts = jnp.asarray([[10, 11, 20]] * 5)
    parents = jnp.asarray([[-1, 0, -1]] * 5)
    tokens = jnp.asarray([[10, 11, 99, 5],   # a1, b1 held: 2 accepted, rows 0, 1, 2
                          [20, 11, 99, 6],   # a2 held (a1 not): 1 accepted, rows 0, 3
                          [30, 1, 2, 3],     # none
                          [10, 12, 99, 7],   # a1 held, b1 not: rows 0, 1
                          [20, 11, 99, 6]])  # as row 1, but with no drafts verified
    rows, accepted = tree.accept(tokens, drafts, parents, jnp.asarray([3, 3, 3, 3, 0]))
    np.testing.assert_array_equal(accepted, [2, 1, 0, 1, 0])
    np.testing.assert_array_equal(rows[:, 0], 0)
    assert rows[0, :3].tolist() == [0, 1, 2] and rows[1, :2].tolist() == [0, 3] and rows[3, :2].tolist() == [0, 1]
    depth = tree.row_depths(parents)  # each row's output index offset: t0 0, a1 1, b1 2, a2 1
    np.testing.assert_array_equal(depth[0], [0, 1, 2, 1])


def test_move_slots_copies_every_layer_and_an_8bit_caches_scales():
    from jaxinfer.paged_attention import PagedKVCache

    for dtype in ("auto", "int8"):
        cache = PagedKVCache.zeros(num_layers=2, num_pages=3, page_size=4, num_kv_heads=1, head_dim=8,
                                   dtype=jnp.float32, kv_cache_dtype=dtype)
        rng = np.random.default_rng(0)
        from pallas_kernels import ops

        kv = jnp.asarray(rng.normal(size=(12, 1, 8)), jnp.float32)
        for layer in (0, 1):
            k, v = ops.write_kv(cache.k, cache.v, kv * (layer + 1), -kv, jnp.arange(12), layer=layer)
            cache = PagedKVCache(k=k, v=v)
        moved = tree.move_slots(cache, jnp.asarray([9, 3]), jnp.asarray([5, tree.NO_SLOT]))
        for layer in (0, 1):  # slot 9 (page 2, offset 1) -> slot 5 (page 1, offset 1); NO_SLOT: nothing
            before, after = np.asarray(cache.k[layer, jnp.arange(3)]), np.array(moved.k[layer, jnp.arange(3)])
            np.testing.assert_array_equal(after[1, 1], before[2, 1])
            after[1, 1] = before[1, 1]
            np.testing.assert_array_equal(after, before)  # nothing else changed
            np.testing.assert_array_equal(np.asarray(moved.v[layer, jnp.asarray([1])])[0, 1],
                                          np.asarray(cache.v[layer, jnp.asarray([2])])[0, 1])


def test_a_backend_without_row_masks_refuses_a_tree():
    from jaxinfer.engine_config import EngineConfig, runner_config

    spec = SpeculativeConfig(method="eagle", model="head", num_speculative_tokens=3, draft_tree=T1)
    config = EngineConfig.of(attention_backend="pallas_tpu")
    with pytest.raises(InvalidRequestError, match="draft_tree"):
        runner_config(config, page_size=16, num_pages=64, max_model_len=256, speculative=spec)
