"""The jitted step functions: pure, module-level, keyed by (graph definition, statics, shapes).

    forward_step(params, kv_cache, inp, graphdef=, attention=, q_block=, unroll=)  -> (hidden [T, D],
                                                   rows [S, D], kv_cache)        KV cache donated
    or, layer by layer (`Runner` with layer_loop="per_layer", and "hybrid"'s steps with prefill):
      embed_step(embed, tokens, positions, cfg=) -> (x, RoPE tables)
      layer_step(p, kv_cache, x, ropes, layer, meta, cfg=, attention=, q_block=) -> (x, kv_cache)
                                                   one graph for every layer, run L times
      rows_step(x, logits_indices)                 -> (hidden [T, D], rows [S, D])
    sample_step(params, rows, si, graphdef=, pad_to=, matmul=) -> (tokens [pad_to], logprobs or None)
    verify_step(params, hidden, vi, si, graphdef=, matmul=) -> (tokens [S, K + 1], num_accepted [S], logprobs)
                                                   speculative decoding: drafts verified
    propose_step(params, head, hidden, tokens, verify_rows=, num_accepted=, graphdef=, num_drafts=, matmul=)
                                                -> drafts [S, k]: the EAGLE head's proposals for the
                                                   next step, dispatched right after the sampler
    draft_propose_step(params, kv_cache, inp, graphdef=, attention=) -> (drafts [S, k], kv_cache): a draft
                                                   model's k greedy decode steps in one graph
    copy_pages(kv_cache, src, dst)                 -> kv_cache with pages dst overwritten by pages src
                                                   (beam search's forks), KV cache donated
    resolve_tokens(tokens, token_src, sampled)     -> tokens [1, T] with the step in flight's samples
                                                   filled in on the device (async scheduling)
    prompt_logprobs_step(params, hidden, rows, targets, graphdef=, matmul=) -> (logprob, top ids, top logprobs)

No bound methods and no closures over an engine: everything that changes the graph is a static
argument (hashable: the NNX GraphDef compares by structure, `AttentionSpec` is a frozen
dataclass), so two engines of the same model and shapes in one process share every compiled graph
(jit's cache is keyed by those statics and the input shapes/shardings). The forward step returns
hidden states that stay on the device; the sampler turns the sampled rows into tokens in its own
small graph, which keeps the big graph free of sampling options.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.config import ModelConfig
from jaxinfer.model import EMBED_KEYS, embed_inputs, embed_tokens, rope_frequencies, run_layer
from jaxinfer.paged_attention import paged_attend
from jaxinfer.runner.inputs import HeadContextInput, ModelInput, SamplingInput, VerifyInput
from jaxinfer.sampling import apply_penalties, logprobs, sample, step_keys
from jaxinfer.sampling_params import MAX_LOGPROBS
from jaxinfer.speculative import eagle
from jaxinfer.speculative import tree as draft_tree
from jaxinfer.speculative.verify import verify
from jaxinfer.structured_output import apply_bitmask
from pallas_kernels.kv_quant import QuantizedPages
from pallas_kernels.quantized_matmul import matmul_backend


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What picks the attention implementation inside the forward graph (static)."""

    backend: str
    max_prefill_seqs: int
    mesh: jax.sharding.Mesh | None = None

    @property
    def matmul_backend(self) -> str:
        """The quantized matmul's backend: the attention's, except under a mesh, where XLA
        partitions the jnp reference (a custom call or a Pallas kernel would be gathered whole)."""
        return self.backend if self.mesh is None else "reference"

    def attend(self, q_block: int):
        if self.mesh is not None and self.mesh.shape["seq"] > 1:
            from sharding.attention import seq_parallel_attend

            return seq_parallel_attend(self.mesh)
        attend = functools.partial(paged_attend, q_block=q_block, max_prefill_seqs=self.max_prefill_seqs,
                                   backend=self.backend)
        if self.mesh is not None:
            from sharding.attention import shard_attend

            attend = shard_attend(attend, self.mesh)
        return attend


@functools.partial(jax.jit, donate_argnames=("kv_cache",),
                   static_argnames=("graphdef", "attention", "q_block", "unroll"))
def forward_step(params, kv_cache, inp: ModelInput, *, graphdef: nnx.GraphDef, attention: AttentionSpec,
                 q_block: int, unroll: bool = False):
    """The decoder over one packed step: (hidden [T, D], the chunks' last rows [S, D], kv_cache).
    unroll: the layers unrolled over per-layer arrays whatever the config says (`Runner`'s "hybrid"
    loop runs its decode and verify steps so)."""
    model = nnx.merge(graphdef, params)
    with matmul_backend(attention.matmul_backend):  # quantized weights: the attention backend's matmul
        hidden, kv_cache = model.forward(inp.tokens, inp.positions, kv_cache, inp.meta, attention.attend(q_block),
                                         unroll=unroll)
    return hidden[0], hidden[0, inp.logits_indices], kv_cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def embed_step(embed, tokens, positions, *, cfg: ModelConfig):
    """embed: the embedding's arrays (`embedding_arrays`); tokens, positions: [1, T] -> (x [1, T, D],
    RoPE tables) for `layer_step`."""
    return embed_inputs(cfg, embed, tokens, positions)


@functools.partial(jax.jit, donate_argnames=("kv_cache",), static_argnames=("cfg", "attention", "q_block"))
def layer_step(p, kv_cache, x, ropes, layer, meta, *, cfg: ModelConfig, attention: AttentionSpec, q_block: int):
    """One decoder block; `layer` is a traced int32, so every layer runs the same compiled graph on
    its own parameter arrays `p` (read in place: no slice of a stacked weight, see
    docs/ARCHITECTURE.md) -> (x, kv_cache)."""
    with matmul_backend(attention.matmul_backend):
        return run_layer(cfg, p, x, kv_cache, layer, ropes, meta, attention.attend(q_block))


@jax.jit
def rows_step(x, logits_indices):
    """x: [1, T, D] -> (hidden [T, D], the chunks' last rows [S, D])."""
    return x[0], x[0, logits_indices]


@functools.partial(jax.jit, static_argnames=("graphdef", "pad_to", "matmul"))
def sample_step(params, rows, si: SamplingInput, *, graphdef: nnx.GraphDef, pad_to: int = 0, matmul: str = "auto"):
    """rows: [S, D] hidden states of the chunks' last tokens -> (tokens [max(S, pad_to)], zero past S;
    logprobs or None). Padded to one length, the tokens of any step feed `resolve_tokens` alike.
    matmul: the output projection's backend (`AttentionSpec.matmul_backend`)."""
    model = nnx.merge(graphdef, params)
    with matmul_backend(matmul):
        raw = model.compute_logits(rows)  # [S, V]
    logits = raw
    p = si.penalties
    if p is not None:
        logits = apply_penalties(raw, p.seen, p.output_counts, p.repetition, p.presence, p.frequency, p.suppress)
    if si.bitmask is not None:  # structured outputs: tokens the row's grammar does not allow are out
        logits = _constrain(logits, raw, si.bitmask)
    keys = step_keys(si.seeds, si.num_generated)
    tokens = sample(logits, si.temperature, si.top_k, si.top_p, keys, si.min_p)
    lps = logprobs(raw, tokens, si.num_logprobs) if si.num_logprobs else None
    if pad_to > tokens.shape[0]:
        tokens = jnp.pad(tokens, (0, pad_to - tokens.shape[0]))
    return tokens, lps


def _constrain(logits, raw, bitmask):
    """The grammar's mask over the penalised logits; where that leaves a row nothing (a complete
    grammar allows only end-of-sequence, which min_tokens holds back) the grammar wins: the mask
    over the raw logits."""
    masked = apply_bitmask(logits, bitmask)
    return jnp.where(jnp.isfinite(masked).any(axis=-1, keepdims=True), masked, apply_bitmask(raw, bitmask))


@functools.partial(jax.jit, static_argnames=("graphdef", "matmul"), donate_argnames=("kv_cache",))
def verify_step(params, hidden, vi: VerifyInput, si: SamplingInput, kv_cache=None, slot_mapping=None, *,
                graphdef: nnx.GraphDef, matmul: str = "auto"):
    """Speculative decoding's sampler: hidden [T, D] of a step whose chunks end with drafts ->
    (tokens [S, K + 1], num_accepted [S], logprobs or None, each [S, K + 1, ...], rows [S, K + 1],
    kv_cache); see `jaxinfer.speculative.verify`. Penalties (and min_tokens' suppression) and a grammar's mask apply
    to every position of a row alike: only rows without drafts carry them (such requests get none).
    Draft trees (`vi.parents`, `speculative.tree`): each row draws with its depth's output index, the
    accepted path's tokens come back in order, `rows` are the path's hidden rows (a chain: vi.rows)
    and its keys and values move to its positions' slots (`slot_mapping`: the step's) in `kv_cache`."""
    model = nnx.merge(graphdef, params)
    S, K1 = vi.rows.shape
    with matmul_backend(matmul):
        raw = model.compute_logits(hidden[vi.rows.reshape(-1)])  # [S * (K + 1), V]
    logits = raw
    p = si.penalties
    if p is not None:
        rep = lambda a: jnp.repeat(a, K1, axis=0)  # noqa: E731
        logits = apply_penalties(raw, rep(p.seen), rep(p.output_counts), rep(p.repetition), rep(p.presence),
                                 rep(p.frequency), rep(p.suppress))
    if si.bitmask is not None:  # (rows with a grammar have no drafts: only their first position samples)
        logits = _constrain(logits, raw, jnp.repeat(si.bitmask, K1, axis=0))
    depth = None if vi.parents is None else draft_tree.row_depths(vi.parents)
    tokens, num_accepted = verify(logits.reshape(S, K1, -1), vi.drafts, vi.num_drafts, si.temperature, si.top_k,
                                  si.top_p, si.min_p, si.seeds, si.num_generated, depth)
    lps = None
    if si.num_logprobs:
        lps = tuple(a.reshape(S, K1, *a.shape[1:]) for a in logprobs(raw, tokens.reshape(-1), si.num_logprobs))
    rows = vi.rows
    if vi.parents is not None:  # the accepted path's rows, in order; its keys and values to their slots
        path, num_accepted = draft_tree.accept(tokens, vi.drafts, vi.parents, vi.num_drafts, depth)
        along = lambda a: jnp.take_along_axis(a, path.reshape(path.shape + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
        tokens, rows = along(tokens), along(vi.rows)
        lps = None if lps is None else tuple(along(a) for a in lps)
        moved = jnp.arange(1, K1)[None] <= num_accepted[:, None]
        src, dst = slot_mapping[rows[:, 1:]], slot_mapping[vi.rows[:, 1:]]
        dst = jnp.where(moved, dst, draft_tree.NO_SLOT)
        kv_cache = draft_tree.move_slots(kv_cache, src.reshape(-1), dst.reshape(-1))
    return tokens, num_accepted, lps, rows, kv_cache


def head_context(head: eagle.DraftHead, kv_cache, ci: HeadContextInput, inv_freq, num_accepted=None) -> eagle.Context:
    """The target's cached keys and values a head's attention reads (its context layer, the pages
    `ci` names), each row's own window of positions up to its last new token's: `ci.position`, or
    after a verify step that plus the drafts accepted (whose keys the step wrote)."""
    hc = head.config
    t = ci.position if num_accepted is None else ci.position + num_accepted
    S, n = ci.pages.shape
    # [S, n, page, K, H] (a cache whose heads are padded to the kernels' lanes: its first H)
    keys, values = (c[hc.context_layer, ci.pages][..., :hc.head_dim] for c in (kv_cache.k, kv_cache.v))
    at = ci.base[:, None] + jnp.arange(n * keys.shape[2], dtype=jnp.int32)[None]  # [S, n * page]
    flat = lambda a: a.reshape(S, -1, *a.shape[-2:])  # noqa: E731
    return eagle.Context(flat(keys), flat(values), (at <= t[:, None]) & (at > (t - hc.context_window)[:, None]), t,
                         jnp.asarray(inv_freq), rotated=isinstance(kv_cache.k, QuantizedPages))


@functools.partial(jax.jit, static_argnames=("graphdef", "num_drafts", "matmul", "tree"))
def propose_step(params, head: eagle.DraftHead, hidden, tokens, verify_rows=None, num_accepted=None, kv_cache=None,
                 context: HeadContextInput | None = None, *, graphdef: nnx.GraphDef, num_drafts: int,
                 matmul: str = "auto", tree: tuple | None = None):
    """The draft head's next drafts [S, k] for every sampler row, from the hidden state that sampled
    each row's last new token and that token: after a sample step hidden [S, D] (its rows) and
    tokens [P >= S]; after a verify step hidden [T, D], tokens [S, K + 1], verify_rows [S, K + 1]
    (`VerifyInput.rows`) and num_accepted [S] (the last new token is at num_accepted). An int8 head's
    matmuls take `matmul` (the runner's: the partitionable reference under a mesh). A head that
    attends reads `kv_cache` where `context` says (`head_context`)."""
    model = nnx.merge(graphdef, params)
    if verify_rows is None:
        feature, token = hidden, tokens[:hidden.shape[0]]
    else:
        last = num_accepted[:, None]
        feature = hidden[jnp.take_along_axis(verify_rows, last, axis=1)[:, 0]]
        token = jnp.take_along_axis(tokens, last, axis=1)[:, 0]
    arrays = {k: getattr(model, k)[...] for k in EMBED_KEYS if hasattr(model, k)}
    ctx = None if context is None else head_context(head, kv_cache, context, rope_frequencies(model.cfg),
                                                    num_accepted)
    embed = functools.partial(embed_tokens, model.cfg, arrays)
    with matmul_backend(matmul):  # (`tree`: a draft tree's paths, `speculative.tree.propose`)
        if tree is not None:
            return draft_tree.propose(head, embed, feature, token, tree, ctx)
        return eagle.propose(head, embed, feature, token, num_drafts, ctx)


@functools.partial(jax.jit, donate_argnames=("kv_cache",), static_argnames=("graphdef", "attention"))
def draft_propose_step(params, kv_cache, inp: ModelInput, *, graphdef: nnx.GraphDef, attention: AttentionSpec):
    """The draft model's k greedy decode steps in one graph (speculative method "draft"): `inp`
    stacks k decode inputs (`inputs.build_draft_inputs`); step i feeds the token step i - 1 chose
    (step 0: `inp.tokens[0]`) -> (drafts [S, k], kv_cache)."""
    model = nnx.merge(graphdef, params)
    attend = attention.attend(1)

    def body(carry, step):
        tokens, kv_cache = carry
        positions, meta = step
        with matmul_backend(attention.matmul_backend):
            hidden, kv_cache = model.forward(tokens, positions, kv_cache, meta, attend)
            chosen = jnp.argmax(model.compute_logits(hidden[0]), axis=-1).astype(jnp.int32)
        return (chosen[None], kv_cache), chosen

    (_, kv_cache), drafts = jax.lax.scan(body, (inp.tokens[0], kv_cache), (inp.positions, inp.meta))
    return drafts.T, kv_cache


@functools.partial(jax.jit, donate_argnames=("kv_cache",))
def copy_pages(kv_cache, src, dst):
    """Every layer's page src[i] copied into page dst[i] (keys, values and, for an 8-bit cache, their
    scales: every leaf has the page on axis 1). Padding pairs copy the null page 0 onto itself."""
    return jax.tree.map(lambda a: a.at[:, dst].set(a[:, src]), kv_cache)


@jax.jit
def resolve_tokens(tokens, token_src, sampled):
    """tokens: [1, T]; token_src: [T] (-1: keep the token); sampled: [P] the tokens of the step in
    flight -> tokens [1, T] with token i replaced by sampled[token_src[i]] where token_src[i] >= 0."""
    return jnp.where(token_src >= 0, sampled[jnp.maximum(token_src, 0)], tokens[0])[None]


@functools.partial(jax.jit, static_argnames=("graphdef", "matmul"))
def prompt_logprobs_step(params, hidden, rows, targets, *, graphdef: nnx.GraphDef, matmul: str = "auto"):
    """hidden: [T, D]; rows, targets: [R] -> logprobs of each target at its row (and the top ones)."""
    model = nnx.merge(graphdef, params)
    with matmul_backend(matmul):
        return logprobs(model.compute_logits(hidden[rows]), targets, MAX_LOGPROBS)
