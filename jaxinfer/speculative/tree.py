"""Draft trees: several candidates verified in one step, each row attending to its own ancestors.

A chain of k drafts spends its last rows on the least likely guesses (SmolLM2's head on chat: the
third draft is right 6% of the time). A tree spends a row on the head's second choice for the
first token instead, whose own next token the step verifies too:

    paths ((0,), (0, 0), (1,)):    t0 -> a1 -> b1        rows [t0, a1, b1, a2], as a chain of 3
                                   t0 -> a2              positions [p, p+1, p+2, p+1]

A node is the path of sibling ranks from the request's last known token t0 (rank 0: the head's
top guess after its parent, rank 1 its second, ...), in the order of `SpeculativeConfig.draft_tree`
(vLLM's `speculative_token_tree` format). Node j is the chunk's row j + 1: its key and value go to
that row's slot (p + j + 1) and its RoPE position is p + its depth; it attends to the positions
before p and the rows of its ancestors and itself (a bit mask over the chunk's rows, `row_masks`,
read by the decode attention: `decode_attention_by_pages`' tree_base / tree_mask).

Verification is plain decoding's, row by row: the target's token at each row is drawn with the key
of the output index it would have (p's token index + the row's depth), and a node is accepted when
its parent is and its token equals the target's token at its parent's row. Siblings differ, so at
most one child of a node holds: the accepted nodes form one path (`accept`), whose tokens and the
target's token after it are exactly what plain decoding emits, greedy or sampled. Where the path
leaves the first rows (a2 above), its keys and values move to the slots of its positions
(`move_slots`) before anything reads them. The scheduler counts a tree step's accepted tokens by
depth: acceptance "by position" j is the share of verified nodes j whose step reached depth j + 1.

    paths_of(value) -> paths          checked (InvalidRequestError says what to change)
    parents_of(paths) -> parents      node j's parent node (-1: t0)
    row_masks(parents) -> [1 + n]     visible chunk rows of each row, as bits
    depths(parents) -> [n]
    trim(tokens, parents, room)       the nodes of depth <= room (re-indexed)
    row_depths(parents) -> [S, K + 1]   each row's depth (its draw's output index), on the device
    accept(tokens, drafts, parents, num_drafts) -> (sample_rows, num_accepted)   on the device
    move_slots(kv_cache, src, dst)    every layer's keys and values at slots src copied to dst
    propose(head, embed, feature, token, paths, context) -> drafts [S, n]   an eagle head's tree
    with_draft_trees(inp, chunks)     a verify step's ModelInput with its trees' positions and masks
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

import numpy as np

from jaxinfer.errors import InvalidRequestError


def paths_of(value, k: int) -> tuple[tuple[int, ...], ...]:
    """A draft tree from a list of node paths (lists or tuples of sibling ranks), checked: k nodes,
    each after its parent, ranks from 0 without gaps, no node twice."""
    def bad(why):
        raise InvalidRequestError(f"draft_tree {value!r}: {why}; e.g. [[0], [0, 0], [1]] (t0 -> a1 -> b1 and "
                                  "t0 -> a2: the head's top two first tokens, the top one's next) or None (a chain)")

    if not isinstance(value, (list, tuple)) or not value:
        bad("expected a non-empty list of node paths")
    paths = []
    for node in value:
        if (not isinstance(node, (list, tuple)) or not node
                or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in node)):
            bad(f"a node is a non-empty list of ranks >= 0, got {node!r}")
        paths.append(tuple(node))
    if len(set(paths)) != len(paths):
        bad("a node appears twice")
    for i, p in enumerate(paths):
        if len(p) > 1 and p[:-1] not in paths[:i]:
            bad(f"node {list(p)} comes before its parent {list(p[:-1])}")
        if p[-1] > 0 and p[:-1] + (p[-1] - 1,) not in paths:
            bad(f"node {list(p)} has no sibling of rank {p[-1] - 1}")
    if len(paths) != k:
        bad(f"{len(paths)} nodes, but num_speculative_tokens is {k} (one row per node)")
    return tuple(paths)


def parents_of(paths: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    index = {p: j for j, p in enumerate(paths)}
    return tuple(index[p[:-1]] if len(p) > 1 else -1 for p in paths)


def depths(parents: Sequence[int]) -> list[int]:
    out = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def row_masks(parents: Sequence[int]) -> list[int]:
    """Bit r of row i's mask: row i sees chunk row r (row 0: t0; row j + 1: node j)."""
    masks = [1]
    for j, p in enumerate(parents):
        masks.append(masks[p + 1] | 1 << (j + 1))
    return masks


def trim(tokens: Sequence[int], parents: Sequence[int], room: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The nodes of depth <= room (what max_tokens, the context and the budget leave), parents
    re-indexed; their order, and so each one's row before its children's, is kept."""
    keep = [j for j, d in enumerate(depths(parents)) if d <= room]
    new = {j: i for i, j in enumerate(keep)}
    return tuple(tokens[j] for j in keep), tuple(-1 if parents[j] < 0 else new[parents[j]] for j in keep)


NO_SLOT = 1 << 30  # a `move_slots` destination that moves nothing (past every cache)


def row_depths(parents):
    """parents [S, K] -> each chunk row's depth [S, K + 1] (row 0, t0: 0), on the device."""
    S, K = parents.shape
    depth = jnp.zeros((S, K + 1), jnp.int32)
    for j in range(K):
        par = parents[:, j]
        up = jnp.take_along_axis(depth, (jnp.maximum(par, -1) + 1)[:, None], axis=1)[:, 0]
        depth = depth.at[:, j + 1].set(up + 1)
    return depth


def accept(tokens, drafts, parents, num_drafts, depth=None):
    """tokens [S, K + 1]: the target's token at each row (row 0: after t0; row j + 1: after node j);
    drafts, parents [S, K] (a chain: parents 0..K-1 shifted, -1 first); num_drafts [S] (nodes past
    it are padding); depth: `row_depths(parents)` where the caller has it -> (sample_rows [S, K + 1],
    num_accepted [S]): the new tokens are tokens[s, sample_rows[s, i]] for i <= num_accepted[s]
    (row 0, then the accepted path's rows; repeated past its end)."""
    S, K = drafts.shape
    take = lambda a, i: jnp.take_along_axis(a, jnp.maximum(i, 0)[:, None], axis=1)[:, 0]  # noqa: E731
    depth = (row_depths(parents) if depth is None else depth)[:, 1:]  # node j's
    ok = jnp.zeros((S, K), bool)
    for j in range(K):  # (K <= MAX_SPECULATIVE_TOKENS: unrolled; a parent's index is below its child's)
        par = parents[:, j]
        held = (par < 0) | take(ok, par)
        ok = ok.at[:, j].set((j < num_drafts) & held & (drafts[:, j] == take(tokens, par + 1)))
    reached = jnp.where(ok, depth, 0)
    num_accepted = reached.max(axis=1).astype(jnp.int32)
    node = jnp.argmax(reached, axis=1).astype(jnp.int32)  # the path's last node (any when none held)
    rows = jnp.zeros((S, K + 1), jnp.int32)
    for _ in range(K):  # walk the path back to t0
        on = (node >= 0) & (num_accepted > 0)
        d = jnp.where(on, take(depth, node), K + 1)  # (K + 1: dropped)
        rows = rows.at[jnp.arange(S), d].set(node + 1, mode="drop")
        node = jnp.where(on & (take(parents, node) >= 0), take(parents, node), -1)
    last = take(rows, num_accepted)
    i = jnp.arange(K + 1, dtype=jnp.int32)[None]
    return jnp.where(i <= num_accepted[:, None], rows, last[:, None]), num_accepted


def move_slots(kv_cache, src, dst):
    """Every layer's keys and values (and an 8-bit cache's scales) at flat slots src [n] copied to
    dst [n] (page * page_size + offset; NO_SLOT: nothing moves)."""
    from jaxinfer.paged_attention import PagedKVCache
    from pallas_kernels.kv_quant import QuantizedPages

    def move(pages):
        if isinstance(pages, QuantizedPages):
            ps = pages.values.shape[-3]
            (sp, so), (dp, do) = (divmod(src, ps)), (divmod(dst, ps))
            values = pages.values.at[:, dp, do].set(pages.values[:, sp, so], mode="drop")
            scale = pages.scale.at[:, dp, 0, :, do].set(pages.scale[:, sp, 0, :, so], mode="drop")
            return QuantizedPages(values, scale, pages.compute_dtype)
        ps = pages.shape[-3]
        (sp, so), (dp, do) = (divmod(src, ps)), (divmod(dst, ps))
        return pages.at[:, dp, do].set(pages[:, sp, so], mode="drop")

    return PagedKVCache(k=move(kv_cache.k), v=move(kv_cache.v))


def propose(head, embed, feature, token, paths, context=None):
    """`eagle.propose` for a draft tree: node p's token is the head's rank-p[-1] guess after its
    parent (t0: `token`, with `feature` the hidden state that sampled it), a head step per node with
    children -> drafts [S, len(paths)] in node order, all on the device."""
    from jaxinfer.speculative import eagle

    hc = head.config
    features, tokens = {(): feature}, {(): token}
    for depth in range(1, max(map(len, paths)) + 1):  # (static: unrolled)
        for parent in dict.fromkeys(p[:-1] for p in paths if len(p) == depth):
            f = eagle.head_step(head.params, hc, features[parent], embed(tokens[parent]), context, depth - 1)
            logits = eagle.draft_logits(head.final_norm, head.lm_head, hc, f)
            children = [p for p in paths if p[:-1] == parent]
            ranks = max(p[-1] for p in children) + 1
            top = jax.lax.top_k(logits, ranks)[1] if ranks > 1 else None
            for p in children:  # (rank 0: the argmax, as a chain's draft)
                features[p] = f
                tokens[p] = head.token_map[jnp.argmax(logits, axis=-1) if p[-1] == 0 else top[:, p[-1]]]
    return jnp.stack([tokens[p] for p in paths], axis=1).astype(jnp.int32)


def chain(k: int) -> tuple[int, ...]:
    """A chain of k drafts as parents."""
    return tuple(range(-1, k - 1))


# ---- a verify step's input (`runner.plan`) ---------------------------------------------------

def causal_rows(S: int, trees: bool) -> dict:
    """A decode step's draft-tree fields of `PagedAttentionMeta`: every row causal (`with_draft_trees`
    sets a verify step's), or none where the runner verifies no trees (one graph either way)."""
    return dict(tree_base=np.zeros(S, np.int32), tree_mask=np.full(S, -1, np.int32)) if trees else {}


def with_draft_trees(inp, chunks):
    """A verify step's input (rows: `buckets.verify_chunks(chunks)`) with its draft trees' rows: each
    node's RoPE position (the chunk's last known token's + its depth) and the chunk rows it sees
    (`row_masks`); other rows stay causal."""
    positions, base, mask = inp.positions.copy(), inp.meta.tree_base.copy(), inp.meta.tree_mask.copy()
    t = 0
    for c in chunks:
        d = len(c.draft_token_ids)
        if c.draft_parents:
            first, p = t + c.num_tokens - d - 1, c.start_pos + c.num_tokens - d - 1  # its last known token
            for r, (m, depth) in enumerate(zip(row_masks(c.draft_parents), [0] + depths(c.draft_parents))):
                base[first + r], mask[first + r], positions[0, first + r] = p, m, p + depth
        t += c.num_tokens
    return inp.replace(positions=positions, meta=inp.meta.replace(tree_base=base, tree_mask=mask))
