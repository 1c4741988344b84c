"""The runner's side of speculative decoding: what each method proposes, and when.

    Drafter(spec, rc, attention, draft_head=, draft_model=, mesh=)
      head_drafts(params, graphdef, hidden, tokens, vi=, num_accepted=, kv_cache=, context=)  eagle: the
                                          head's drafts [S, k], dispatched with the step (after its
                                          sampler or verifier)
      context_input(chunks, requests, S)  eagle, a head that attends: where it reads the target's cache
      track(chunks, requests) -> bool     draft: whether the step runs the draft model, and how far each
                                          request's tokens are in its cache (`CachedRequest.draft_len`)
      forward(inp, q_block)               draft: the step's tokens through the draft model, into its
                                          own KV cache (the target's page tables, `speculative.draft`)
      proposals(rows, num_running, device_drafts) -> {request id: drafts} | None   after a step is
                                          collected: prompt lookup's where a suffix recurs (`lookup_min`,
                                          `proposers.lookup_in_place`), else the head's drafts (eagle) or
                                          k greedy decode steps of the draft model (draft: only for the
                                          requests lookup gives none); None for ngram (proposed on the
                                          host by `speculative.proposers.next_drafts`)

No proposals where as many requests run as turn drafts off (`SpeculativeConfig.drafts_at`): the
next step verifies none, and the draft model does not run in such a step at all (running it over
every step's tokens while drafts were off cost 0.72-0.99x plain at 8 concurrent). Its cache then
misses those steps' tokens, so a request proposes only while every token before its last is in
the draft's cache: one that was computed in a step without the draft model, or that found pages
in the prefix cache after any such step (they may hold no draft keys), drafts no more (measured
with the target as its own draft: drafts over a cache with such a gap were accepted 0 of 39 times).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxinfer.paged_attention import DecodeItems, PagedAttentionMeta

from jaxinfer.model import params_for_layer_loop
from jaxinfer.runner.buckets import RunnerConfig, StepShape, decode_shape
from jaxinfer.runner.inputs import (HeadContextInput, ModelInput, VerifyInput, build_head_context, empty_model_input,
                                    pad_rows)
from jaxinfer.runner.requests import CachedRequest
from jaxinfer.runner.steps import AttentionSpec, draft_propose_step, forward_step, propose_step
from jaxinfer.speculative import SpeculativeConfig
from jaxinfer.speculative.draft import DraftModel
from jaxinfer.speculative.eagle import DraftHead
from jaxinfer.speculative.proposers import TreeDrafts, lookup_in_place, proposes
from jaxinfer.speculative.tree import parents_of
from pallas_kernels.paged_attention_reference import decode_items


class Drafter:
    """Args:
      spec: the speculative config (resolved: no "auto" left).
      rc: the runner's config (k, page size, buckets).
      attention: the runner's attention spec (the draft model attends like the target).
      draft_head: method "eagle": the loaded head (`speculative.eagle.load_head`).
      draft_model: method "draft": the loaded draft model (`speculative.draft.load_draft`).
      mesh: the runner's mesh (the head is replicated over it; method "draft" runs without one).
      make_cache: ModelConfig -> an empty PagedKVCache of the runner's geometry.
    """

    def __init__(self, spec: SpeculativeConfig, rc: RunnerConfig, attention: AttentionSpec, *,
                 draft_head: DraftHead | None = None, draft_model: DraftModel | None = None, mesh=None,
                 make_cache=None):
        if (draft_head is not None) != (spec.method == "eagle"):
            raise ValueError("a draft head goes with speculative method 'eagle', and only with it")
        if (draft_model is not None) != (spec.method == "draft"):
            raise ValueError("a draft model goes with speculative method 'draft', and only with it")
        if draft_model is not None and mesh is not None:
            raise ValueError("speculative method 'draft' runs on one device without a mesh")
        if draft_head is not None and mesh is not None:  # replicated over the mesh
            draft_head = jax.device_put(draft_head, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        self.spec, self.rc, self.attention = spec, rc, attention
        self.head, self.model = draft_head, draft_model
        tree = spec.draft_tree  # eagle with a draft tree: its parents, once (`proposals`)
        self.tree_parents = parents_of(tree) if isinstance(tree, tuple) else None
        self.params = self.kv_cache = None
        self.skipped = False  # draft: a step ran without the draft model (`track`)
        if draft_model is not None:  # its own cache: the same pages and slots, its own layers and heads
            self.params = params_for_layer_loop(draft_model.config, draft_model.params)
            # committed to the device like its parameters and like every cache a step returns, so the
            # graphs warm-up compiles are the ones steps call
            self.kv_cache = jax.device_put(make_cache(draft_model.config), jax.local_devices()[0])

    # ---- eagle ---------------------------------------------------------------------------------

    def proposes_on_device(self, num_running: int) -> bool:
        """Whether the head proposes in a step of `num_running` requests (eagle)."""
        return self.head is not None and self.spec.drafts_at(num_running)

    def head_drafts(self, params, graphdef, hidden, tokens, vi: VerifyInput | None = None, num_accepted=None,
                    kv_cache=None, context: HeadContextInput | None = None):
        """eagle: the next step's drafts [S, k] of every sampler row (see `propose_step`); `params`,
        `graphdef`: the target's (its embedding, final norm and output rows); `kv_cache`, `context`:
        the target's cache and where a head that attends reads it (`context_input`)."""
        if context is None:
            kv_cache = None
        elif vi is not None and vi.rows.shape[0] > context.position.shape[0]:  # (rows padded like the sampler's)
            context = pad_rows(context, vi.rows.shape[0] - context.position.shape[0])
        return propose_step(params, self.head, hidden, tokens, None if vi is None else vi.rows, num_accepted,
                            kv_cache, context, graphdef=graphdef, num_drafts=self.rc.num_speculative_tokens,
                            matmul=self.attention.matmul_backend, tree=self.spec.draft_tree)

    def context_input(self, chunks, requests: dict[str, CachedRequest], S: int) -> HeadContextInput | None:
        """eagle: where the head's attention reads the target's cache after a step of `chunks` (S
        sampler rows), or None for a head without attention."""
        window = None if self.head is None else self.head.config.context_window
        if not window:
            return None
        return build_head_context(chunks, requests, S, window, self.rc.num_speculative_tokens, self.rc.page_size)

    # ---- draft ---------------------------------------------------------------------------------

    def track(self, chunks, requests: dict[str, CachedRequest]) -> bool:
        """draft: whether a step of `chunks` runs the draft model over its tokens (only a step after
        which it proposes: `proposals` asks `drafts_at` of the same count), and each chunk's request's
        `draft_len` moved past the chunk when it does. A request's first chunk that starts past 0
        found its pages in the prefix cache: their draft keys are there unless a step ever ran
        without the draft model."""
        if self.model is None:
            return False
        if not self.spec.drafts_at(len(chunks)):
            self.skipped = True
            return False
        for c in chunks:
            request = requests[c.request_id]
            if request.draft_len == 0 and not self.skipped:  # (prefix-cache pages: all written with it running)
                request.draft_len = c.start_pos
            if c.start_pos <= request.draft_len:  # contiguous (a verify step's rejected slots are rewritten)
                request.draft_len = c.start_pos + c.num_tokens
        return True

    def forward(self, inp: ModelInput, q_block: int) -> None:
        """draft: the step's tokens through the draft model, into its own KV cache (a step `track`
        said runs it)."""
        _, _, self.kv_cache = forward_step(self.params, self.kv_cache, inp, graphdef=self.model.graphdef,
                                           attention=self.attention, q_block=q_block)

    def model_drafts(self, requests: list[CachedRequest]) -> np.ndarray:
        """draft: k greedy drafts [len(requests), k] from each request's last token (its history is up
        to date: the step's tokens are collected)."""
        rc, k = self.rc, self.rc.num_speculative_tokens
        ends = [int(draft_positions(r, k, rc.page_size)[-1]) + 1 for r in requests]
        inp = build_draft_inputs(requests, k, decode_shape(rc, len(requests), ends), rc.page_size, rc.pages_per_item)
        drafts, self.kv_cache = draft_propose_step(self.params, self.kv_cache, inp, graphdef=self.model.graphdef,
                                                   attention=self.attention)
        return np.asarray(drafts)[:len(requests)]

    # ---- after a step ------------------------------------------------------------------------------

    def proposals(self, rows: dict, num_running: int, device_drafts: np.ndarray | None) -> dict | None:
        """The drafts after a collected step, by request id, for the requests that take drafts: prompt
        lookup's where a suffix of `lookup_min` tokens recurs (`LookupDrafts`), else the head's,
        which came back with the step (`device_drafts` [S, k], eagle), or the draft model's, decoded
        now for those requests only; None for ngram. rows: request id -> (CachedRequest, its sampler
        row)."""
        method = self.spec.method
        if method == "ngram":
            return None
        if method == "eagle":  # (prompt lookup's drafts in place of the head's where a suffix recurs)
            if device_drafts is None:
                return {}
            parents = self.tree_parents  # (the head's drafts: a tree's nodes, or a chain)
            return {rid: lookup_in_place(self.spec, request) or (
                device_drafts[s].tolist() if parents is None else TreeDrafts(device_drafts[s].tolist(), parents))
                for rid, (request, s) in rows.items() if proposes(request)}
        if not self.spec.drafts_at(num_running):
            return {}  # the next step verifies none
        wanted = [(rid, request) for rid, (request, _) in rows.items()  # (draft keys for all but its last token)
                  if proposes(request) and request.block_ids and request.draft_len >= len(request.token_ids) - 1]
        # where prompt lookup's drafts replace the model's (`lookup_min`) the model decodes nothing
        lookups = {rid: found for rid, request in wanted if (found := lookup_in_place(self.spec, request))}
        wanted = [(rid, request) for rid, request in wanted if rid not in lookups]
        if not wanted:
            return lookups
        drafts = self.model_drafts([request for _, request in wanted])
        return lookups | {rid: drafts[i].tolist() for i, (rid, _) in enumerate(wanted)}


# ---- the draft model's inputs -------------------------------------------------------------------


def draft_positions(request: CachedRequest, k: int, page_size: int) -> np.ndarray:
    """The k positions the draft model decodes at for `request`: its last token's, then the next
    k - 1 (held at the last slot its pages hold: at the context's end the scheduler's look-ahead
    stops short, and drafts past the end are never verified)."""
    last = len(request.token_ids) - 1
    return np.minimum(last + np.arange(k), len(request.block_ids) * page_size - 1).astype(np.int32)


def build_draft_inputs(requests: list[CachedRequest], k: int, shape: StepShape, page_size: int,
                       pages_per_item: int) -> ModelInput:
    """The draft model's k decode steps over `requests` (speculative method "draft"), stacked on a
    leading axis of k: step i feeds each request's token at its last position + i (step 0 its
    last token, `tokens[0]`; later steps the draft's own previous token, filled in on the device)
    and writes that position's slot."""
    S, W = shape.S, shape.W
    tokens = np.zeros((k, 1, S), np.int32)
    positions = np.zeros((k, S), np.int32)
    slots = np.zeros((k, S), np.int32)  # padding rows write into the null page
    kv_lens = np.zeros((k, S), np.int32)
    table = np.zeros((S, max([W] + [len(r.block_ids) for r in requests])), np.int32)
    for s, request in enumerate(requests):
        blocks = np.asarray(request.block_ids, np.int32)
        pos = draft_positions(request, k, page_size)
        tokens[0, 0, s] = request.token_ids[-1]
        positions[:, s] = pos
        slots[:, s] = blocks[pos // page_size] * page_size + pos % page_size
        kv_lens[:, s] = pos + 1
        table[s, :len(blocks)] = blocks
    cu = np.minimum(np.arange(S + 1), len(requests)).astype(np.int32)
    metas = []
    for i in range(k):
        items = None
        if shape.is_decode:
            items = DecodeItems(*decode_items(kv_lens[i], table, page_size, shape.I, pages_per_item))
        metas.append(PagedAttentionMeta(slot_mapping=slots[i], kv_lens=kv_lens[i], page_table=table[:, :W],
                                        cu_q_lens=cu, num_seqs=np.int32(len(requests)), decode_items=items))
    meta = jax.tree.map(lambda *a: np.stack(a), *metas)
    return ModelInput(tokens=tokens, positions=positions[:, None], meta=meta,
                      logits_indices=np.broadcast_to(np.arange(S, dtype=np.int32), (k, S)))


def empty_draft_inputs(shape: StepShape, k: int, page_size: int, pages_per_item: int) -> ModelInput:
    """An all-padding `build_draft_inputs` of `shape` (warm-up)."""
    return jax.tree.map(lambda a: np.stack([a] * k), empty_model_input(shape, page_size, pages_per_item))
