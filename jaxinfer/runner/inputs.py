"""Device inputs of a step, built on the host (numpy) from a SchedulerOutput and the runner's own
per-request state.

    SchedulerOutput.chunks  a: 6 tokens @0 | b: 1 token @9 | c: 4 tokens @0     (3 sequences)
    ModelInput.tokens [1, T] a a a a a a b c c c c 0 0 0 0 0                   (T padded to a bucket)
    token_src         [T]    -1 ...         3 -1 ...                           (async: b's token is
                                                                  row 3 of the step in flight's sample)
    slot_mapping      [T]    a's slots ... | padding -> null page 0
    page_table        [S, W] W = the page-table width bucket covering the longest sequence
    logits_indices    [S]    last token of each chunk (only chunks that sample use it)

A request's data (prompt, sampling params, seed) crosses from the scheduler once, when it is first
admitted (`NewRequestData`); the runner keeps it in a `CachedRequest` with the token history it
appends to as it samples and the page table each chunk's new pages extend, and drops it when the
scheduler reports the request finished. The tokens of a chunk come from that history; the one
token a step still in flight is sampling (async scheduling) is taken from that step's device
output (`token_src`), never waited for.
With data parallelism each replica's inputs are built alike and stacked (`stack_*`): replica r owns
the r-th slice of every array.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import numpy as np

from jaxinfer.paged_attention import DecodeItems, PagedAttentionMeta
from jaxinfer.runner.buckets import StepShape, chunk_pages
from jaxinfer.runner.requests import CachedRequest
from jaxinfer.speculative.tree import causal_rows, chain
from jaxinfer.sampling_params import MAX_LOGPROBS
from jaxinfer.structured_output import bitmask_width, fill_bitmasks
from pallas_kernels.paged_attention_reference import decode_items


@flax.struct.dataclass
class ModelInput:
    tokens: jax.Array  # [1, T] int32
    positions: jax.Array  # [1, T] int32
    meta: PagedAttentionMeta
    logits_indices: jax.Array  # [S] int32: the last token of each chunk (the rows to sample from)


@flax.struct.dataclass
class VerifyInput:
    """Speculative decoding: where each sequence's positions are and what its drafts say."""

    rows: jax.Array  # [S, K + 1] int32: the chunk's last known token, then its drafts (repeated past them)
    drafts: jax.Array  # [S, K] int32
    num_drafts: jax.Array  # [S] int32
    parents: jax.Array | None = None  # [S, K] int32: draft trees' (`speculative.tree`); None: chains


@flax.struct.dataclass
class HeadContextInput:
    """Where a draft head's attention reads the target's cache (`eagle.Context`), per sampler row:
    the position of its last known token (a verify step's rows then move on by the drafts accepted),
    the pages around it and the position of the first page's first slot."""

    position: jax.Array  # [S] int32
    pages: jax.Array  # [S, n] int32 (padding rows: the null page 0)
    base: jax.Array  # [S] int32


def head_context_pages(window: int, k: int, page_size: int) -> int:
    """Pages `build_head_context` gathers per row: the window before a row's last known token and
    the k drafts after it, wherever the window starts within a page."""
    return -(-(window + k) // page_size) + 1


def build_head_context(chunks, requests: dict[str, CachedRequest], S: int, window: int, k: int,
                       page_size: int) -> HeadContextInput:
    n = head_context_pages(window, k, page_size)
    position, base, pages = np.zeros(S, np.int32), np.zeros(S, np.int32), np.zeros((S, n), np.int32)
    for s, c in enumerate(chunks):
        blocks = requests[c.request_id].block_ids
        position[s] = t = c.start_pos + c.num_tokens - len(c.draft_token_ids) - 1
        first = max(t - window + 1, 0) // page_size
        base[s] = first * page_size
        pages[s] = [blocks[min(first + j, len(blocks) - 1)] for j in range(n)]  # (past its pages: masked)
    return HeadContextInput(position, pages, base)


@flax.struct.dataclass
class Penalties:
    """Per-row token history, present only when some row in the step needs it."""

    seen: jax.Array  # [S, V] bool: in the prompt or the output
    output_counts: jax.Array  # [S, V] f32
    repetition: jax.Array  # [S] f32
    presence: jax.Array  # [S] f32
    frequency: jax.Array  # [S] f32
    suppress: jax.Array  # [S, V] bool: may not be sampled yet (min_tokens)


@flax.struct.dataclass
class SamplingInput:
    temperature: jax.Array  # [S] f32
    top_k: jax.Array  # [S] int32
    top_p: jax.Array  # [S] f32
    min_p: jax.Array  # [S] f32
    seeds: jax.Array  # [S] uint32
    num_generated: jax.Array  # [S] int32
    penalties: Penalties | None = None
    num_logprobs: int = flax.struct.field(pytree_node=False, default=0)  # 0 or MAX_LOGPROBS
    bitmask: jax.Array | None = None  # [S, ceil(V / 32)] int32: allowed tokens (structured outputs), -1: all

    @property
    def largest_bucket_only(self) -> bool:
        """Whether this input needs a sampler variant compiled for the largest bucket only."""
        return self.penalties is not None or bool(self.num_logprobs) or self.bitmask is not None


def empty_model_input(shape: StepShape, page_size: int, pages_per_item: int, trees: bool = False) -> ModelInput:
    """An all-padding input of `shape` (warm-up)."""
    T, S, W = shape.T, shape.S, shape.W
    items = None
    if shape.is_decode:
        items = DecodeItems(*decode_items(np.zeros(S, np.int32), np.zeros((S, 1), np.int32), page_size, shape.I,
                                          pages_per_item))
    meta = PagedAttentionMeta(slot_mapping=np.zeros(T, np.int32), kv_lens=np.zeros(S, np.int32),
                              page_table=np.zeros((S, W), np.int32), cu_q_lens=np.zeros(S + 1, np.int32),
                              num_seqs=np.int32(0), decode_items=items, **causal_rows(S, trees and items is not None))
    return ModelInput(tokens=np.zeros((1, T), np.int32), positions=np.zeros((1, T), np.int32), meta=meta,
                      logits_indices=np.zeros(S, np.int32))


def build_model_input(chunks, requests: dict[str, CachedRequest], shape: StepShape, page_size: int,
                      pages_per_item: int, pending: dict[str, int] | None = None, trees: bool = False
                      ) -> tuple[ModelInput, np.ndarray | None]:
    """Packs the scheduled chunks into one padded ragged row (numpy; moved by jit).

    Args:
      pending: request id -> its row in the output of the step in flight, for the requests whose
        next token that step is sampling (async scheduling).
      trees: the runner verifies draft trees: a decode step's meta has their fields (`causal_rows`).

    Returns:
      The input, and `token_src` [T] (the row of the step in flight's sampled tokens to read a
      token from, -1: the token in `tokens`), or None when every token is known here.
    """
    T, S, W = shape.T, shape.S, shape.W
    tokens = np.zeros(T, np.int32)
    token_src = None
    positions = np.zeros(T, np.int32)
    slots = np.zeros(T, np.int32)  # padding writes into the null page
    # Every page of every chunk; mixed steps see the first W columns (W covers them all), decode
    # steps turn it into work items instead.
    width = max((chunk_pages(c, page_size) for c in chunks), default=0)
    table = np.zeros((S, max(W, width)), np.int32)
    kv_lens = np.zeros(S, np.int32)
    cu = np.zeros(S + 1, np.int32)
    t = 0
    for s, chunk in enumerate(chunks):
        n, start = chunk.num_tokens, chunk.start_pos
        request = requests[chunk.request_id]
        pos = np.arange(start, start + n)
        blocks = np.asarray(request.block_ids, np.int32)
        d = len(chunk.draft_token_ids)
        tokens[t + n - d:t + n] = chunk.draft_token_ids  # (speculative decoding: verified this step)
        known = min(n - d, len(request.token_ids) - start) if n > d else 0  # (a lone draft row: none)
        tokens[t:t + known] = request.token_ids[start:start + known]
        if known < n - d:  # the last token is the one the step in flight samples
            row = (pending or {}).get(chunk.request_id)
            if known != n - d - 1 or row is None:
                raise RuntimeError(f"request {chunk.request_id!r}: positions {start}..{start + n - 1} scheduled but "
                                   f"only {len(request.token_ids)} tokens known and none in flight")
            if token_src is None:
                token_src = np.full(T, -1, np.int32)
            token_src[t + known] = row
        positions[t:t + n] = pos
        slots[t:t + n] = blocks[pos // page_size] * page_size + pos % page_size
        used = chunk_pages(chunk, page_size)  # (pages past it: held for drafts a step rejected)
        table[s, :used] = blocks[:used]
        kv_lens[s] = start + n
        t += n
        cu[s + 1] = t
    cu[len(chunks) + 1:] = t
    items = None
    if shape.is_decode:
        items = DecodeItems(*decode_items(kv_lens, table, page_size, shape.I, pages_per_item))
    meta = PagedAttentionMeta(slot_mapping=slots, kv_lens=kv_lens, page_table=table[:, :W], cu_q_lens=cu,
                              num_seqs=np.int32(len(chunks)), decode_items=items,
                              **causal_rows(S, trees and items is not None))
    drafts = np.asarray([len(c.draft_token_ids) for c in chunks] + [0] * (S - len(chunks)), np.int32)
    logits_indices = np.maximum(cu[1:] - 1 - drafts, 0).astype(np.int32)  # a chunk's last known token
    return ModelInput(tokens=tokens[None], positions=positions[None], meta=meta,
                      logits_indices=logits_indices), token_src


def build_verify_input(chunks, S: int, K: int, trees: bool = False) -> VerifyInput:
    """Rows of the hidden state to verify (speculative decoding: `num_speculative_tokens` = K):
    the step runs `buckets.verify_chunks(chunks)`, chunk s's 1 + d tokens in consecutive rows;
    `trees`: with each chunk's draft parents (a chain's where it has none)."""
    drafts = np.zeros((S, K), np.int32)
    num_drafts = np.zeros(S, np.int32)
    first = np.zeros(S, np.int32)
    t = 0
    for s, chunk in enumerate(chunks):
        d = len(chunk.draft_token_ids)
        drafts[s, :d] = chunk.draft_token_ids
        num_drafts[s] = d
        first[s] = t + chunk.num_tokens - d - 1  # its last known token
        t += chunk.num_tokens
    rows = first[:, None] + np.minimum(np.arange(K + 1)[None], num_drafts[:, None])
    parents = None
    if trees:
        parents = np.tile(np.asarray(chain(K), np.int32), (S, 1))
        for s, chunk in enumerate(chunks):
            parents[s, :len(chunk.draft_parents)] = chunk.draft_parents
    return VerifyInput(rows=rows.astype(np.int32), drafts=drafts, num_drafts=num_drafts, parents=parents)


def neutral_penalties(S: int, V: int) -> Penalties:
    return Penalties(seen=np.zeros((S, V), bool), output_counts=np.zeros((S, V), np.float32),
                     repetition=np.ones(S, np.float32), presence=np.zeros(S, np.float32),
                     frequency=np.zeros(S, np.float32), suppress=np.zeros((S, V), bool))


def neutral_sampling_input(S: int, V: int, *, with_penalties: bool = False, num_logprobs: int = 0,
                           with_bitmask: bool = False) -> SamplingInput:
    """A sampling input that changes nothing (warm-up)."""
    return SamplingInput(temperature=np.ones(S, np.float32), top_k=np.zeros(S, np.int32),
                         top_p=np.ones(S, np.float32), min_p=np.zeros(S, np.float32), seeds=np.zeros(S, np.uint32),
                         num_generated=np.zeros(S, np.int32),
                         penalties=neutral_penalties(S, V) if with_penalties else None, num_logprobs=num_logprobs,
                         bitmask=np.full((S, bitmask_width(V)), -1, np.int32) if with_bitmask else None)


def build_bitmask(chunks, requests: dict[str, CachedRequest], S: int, V: int) -> np.ndarray | None:
    """The packed allowed-token mask [S, ceil(V / 32)] of a step's rows (structured outputs, thinking
    budgets): each sampling row whose constraint restricts this step gets its allowed tokens, every
    other row all ones; None when no row is restricted. The constraints must already have every
    earlier token of their request."""
    rows = [(requests[c.request_id].grammar, s) for s, c in enumerate(chunks)
            if c.samples and requests[c.request_id].grammar is not None and requests[c.request_id].grammar.restricts]
    if not rows:
        return None
    bitmask = np.full((S, bitmask_width(V)), -1, np.int32)
    grammars = []
    for constraint, s in rows:  # a thinking budget writes its own row, or hands it to the answer's grammar
        grammar = constraint.restrict(bitmask[s])
        if grammar is not None:
            grammars.append((grammar, s))
    if grammars:
        fill_bitmasks(bitmask, grammars)
    return bitmask


def build_sampling_input(chunks, requests: dict[str, CachedRequest], S: int, V: int,
                         eos_token_ids: tuple[int, ...]) -> SamplingInput:
    """Per-row sampling tensors of the chunks that sample (rows of other chunks stay neutral).

    A row's seed stream is indexed by the position it samples (`num_generated`), known from the
    chunk alone; penalties read the token history, which the caller completes first."""
    temperature, top_p, min_p = np.zeros(S, np.float32), np.ones(S, np.float32), np.zeros(S, np.float32)
    top_k, seeds, num_generated = np.zeros(S, np.int32), np.zeros(S, np.uint32), np.zeros(S, np.int32)
    needs_history = []
    want_logprobs = False
    for s, chunk in enumerate(chunks):
        if not chunk.samples:
            continue
        request = requests[chunk.request_id]
        p = request.params
        temperature[s], top_p[s], min_p[s] = p.temperature, p.top_p, p.min_p
        top_k[s] = p.top_k if 0 < p.top_k < V else 0  # k >= vocab keeps every token: disabled
        seeds[s] = request.seed % (1 << 32)
        # (the output index of the token its last known token samples; drafts are not known tokens)
        known = chunk.num_tokens - len(chunk.draft_token_ids)
        num_generated[s] = chunk.start_pos + known - request.num_prompt_tokens
        want_logprobs |= p.logprobs is not None
        if p.needs_penalties or num_generated[s] < p.min_tokens:
            needs_history.append((s, request))
    penalties = None
    if needs_history:
        penalties = neutral_penalties(S, V)
        for s, request in needs_history:
            p = request.params
            output = request.output_token_ids
            penalties.repetition[s] = p.repetition_penalty
            penalties.presence[s] = p.presence_penalty
            penalties.frequency[s] = p.frequency_penalty
            penalties.seen[s, request.prompt_token_ids] = True
            penalties.seen[s, output] = True
            penalties.output_counts[s] = np.bincount(output, minlength=V)[:V]
            if num_generated[s] < p.min_tokens:
                penalties.suppress[s, [i for i in p.ending_token_ids(eos_token_ids) if i < V]] = True
    return SamplingInput(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds,
                         num_generated=num_generated, penalties=penalties,
                         num_logprobs=MAX_LOGPROBS if want_logprobs else 0)


def prompt_logprob_rows(chunks, requests: dict[str, CachedRequest]):
    """Hidden-state rows whose next-token logprobs a request's prompt_logprobs wants:
    (rows, target token ids, (request id, position) owners)."""
    rows, targets, owners = [], [], []
    t = 0
    for chunk in chunks:
        request = requests[chunk.request_id]
        if request.params.prompt_logprobs is not None:
            for i in range(chunk.num_tokens):
                pos = chunk.start_pos + i  # row i predicts the token at pos + 1
                if pos + 1 < request.num_prompt_tokens:
                    rows.append(t + i)
                    targets.append(request.token_ids[pos + 1])
                    owners.append((chunk.request_id, pos + 1))
        t += chunk.num_tokens
    return rows, targets, owners


# ---- data parallelism: every replica's step packed into one -------------------------------------

def _cat(arrays, axis=0):
    return np.concatenate([np.asarray(a) for a in arrays], axis=axis)


def stack_model_inputs(inputs: list[ModelInput], T: int) -> ModelInput:
    """Per-replica ModelInputs of one shape -> one, replica r in the r-th slice of every array."""
    metas = [m.meta for m in inputs]
    items = None
    if metas[0].decode_items is not None:
        items = DecodeItems(seq=_cat([m.decode_items.seq for m in metas]),
                            page=_cat([m.decode_items.page for m in metas]),
                            pos=_cat([m.decode_items.pos for m in metas]))
    meta = PagedAttentionMeta(slot_mapping=_cat([m.slot_mapping for m in metas]),
                              kv_lens=_cat([m.kv_lens for m in metas]), page_table=_cat([m.page_table for m in metas]),
                              cu_q_lens=_cat([m.cu_q_lens for m in metas]),
                              num_seqs=np.asarray([m.num_seqs for m in metas], np.int32), decode_items=items)
    return ModelInput(tokens=_cat([m.tokens for m in inputs], axis=1),
                      positions=_cat([m.positions for m in inputs], axis=1), meta=meta,
                      logits_indices=_cat([m.logits_indices + r * T for r, m in enumerate(inputs)]))


def stack_sampling_inputs(inputs: list[SamplingInput], vocab_size: int) -> SamplingInput:
    """Per-replica SamplingInputs -> one (penalties everywhere if any replica needs them)."""
    penalties = None
    if any(s.penalties is not None for s in inputs):
        parts = [s.penalties or neutral_penalties(len(s.temperature), vocab_size) for s in inputs]
        penalties = Penalties(**{f.name: _cat([getattr(p, f.name) for p in parts])
                                 for f in dataclasses.fields(Penalties)})
    bitmask = None
    if any(s.bitmask is not None for s in inputs):
        bitmask = _cat([s.bitmask if s.bitmask is not None else np.full((len(s.temperature), bitmask_width(vocab_size)),
                                                                          -1, np.int32) for s in inputs])
    fields = ("temperature", "top_k", "top_p", "min_p", "seeds", "num_generated")
    return SamplingInput(**{f: _cat([getattr(s, f) for s in inputs]) for f in fields}, penalties=penalties,
                         num_logprobs=max(s.num_logprobs for s in inputs), bitmask=bitmask)


def pad_rows(tree, pad: int):
    """Every array of `tree` padded with `pad` zero rows on its first axis (on the host)."""
    return jax.tree.map(lambda a: np.pad(np.asarray(a), [(0, pad)] + [(0, 0)] * (np.ndim(a) - 1)), tree)
