"""Warm-up: every graph a step can need, compiled before the first request (nothing compiles after).

Without a mesh the graphs are lowered from abstract inputs and compiled ahead of time, nothing runs
(`aot_graphs`: every step shape's forward or per-layer graphs, `resolve_tokens` with async
scheduling, the sampler variants, prompt logprobs). With a mesh each step shape runs once on padding
inputs, so the graphs see the shardings real steps produce.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.model import embedding_arrays
from jaxinfer.runner.buckets import decode_shapes, one_graph, verify_seqs
from jaxinfer.runner.drafter import empty_draft_inputs
from jaxinfer.runner.inputs import (VerifyInput, build_verify_input, empty_model_input, neutral_sampling_input,
                                    stack_model_inputs, stack_sampling_inputs)
from jaxinfer.runner.steps import (draft_propose_step, embed_step, forward_step, layer_step, prompt_logprobs_step,
                                   propose_step, resolve_tokens, rows_step, sample_step, verify_step)
from jaxinfer.sampling_params import MAX_LOGPROBS

# The sampler graphs a step can need: every (penalties, logprobs, grammar mask) combination.
SAMPLER_VARIANTS = tuple(itertools.product((False, True), (0, MAX_LOGPROBS), (False, True)))


def _variant_kwargs(variant) -> dict:
    with_penalties, num_logprobs, with_bitmask = variant
    return dict(with_penalties=with_penalties, num_logprobs=num_logprobs, with_bitmask=with_bitmask)


def warmup(runner, progress: bool = False, threads: int = 1, cancel=None) -> int:
    """Compiles every graph a step can need (every step shape, sampler variant and prompt-logprob
    shape); returns how many were compiled. Without a mesh the graphs are compiled ahead of time
    from abstract inputs, `threads` at once (1: on the calling thread; the server asks for one per
    core), and nothing runs; with a mesh each shape runs once on padding inputs. `cancel` (a
    threading.Event, AOT path): once set, graphs not started yet are skipped (a server shutting
    down while it compiles in the background)."""
    if runner.mesh is not None:
        return warmup_by_running(runner, progress)
    graphs = aot_graphs(runner)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(graphs), desc="Compiling steps", unit="graph")

    def compile_graph(g) -> int:
        if cancel is not None and cancel.is_set():
            return 0
        g[0].lower(*g[1], **g[2]).compile()
        return 1

    done = 0
    if threads <= 1:
        for g in graphs:
            done += compile_graph(g)
            if bar is not None:
                bar.update(1)
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            for f in concurrent.futures.as_completed([pool.submit(compile_graph, g) for g in graphs]):
                done += f.result()
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return done


def aot_graphs(runner) -> list[tuple]:
    """(jitted function, args, kwargs) of every graph, args abstract where they are device
    results (hidden states, sampled rows), real where they are what a step passes."""
    rc, cfg, V = runner.rc, runner.config, runner.config.vocab_size
    dtype, D = jnp.dtype(cfg.dtype), cfg.hidden_size
    drafter = runner.drafter  # speculative decoding's proposers (None without)
    graphs, seen = [], set()

    def add(fn, args, kwargs, key, priority):
        if key not in seen:
            seen.add(key)
            graphs.append((priority, len(graphs), (fn, args, kwargs)))

    # Likeliest first (a server compiles in the background while it serves): the plain samplers,
    # then every step shape with the fewest pages per sequence (short conversations), then the next
    # page bucket, ...; prompt logprobs and the penalty / logprob samplers last.
    shapes = runner.all_step_shapes()
    sizes: dict[tuple, list[int]] = {}
    for shape in shapes:
        group, size = ((True, shape.S), shape.I) if shape.is_decode else ((False, shape.T), shape.W)
        sizes.setdefault(group, []).append(size)
    rare = 1 + max(map(len, sizes.values()), default=0)
    matmul = runner.attention.matmul_backend  # the output projection's backend, as the runner passes it

    for shape in shapes:
        inp = empty_model_input(shape, rc.page_size, rc.pages_per_item, trees=rc.draft_tree)
        group, size = ((True, shape.S), shape.I) if shape.is_decode else ((False, shape.T), shape.W)
        priority = 1 + sorted(sizes[group]).index(size)
        if not one_graph(runner.layer_loop, shape):
            embed = embedding_arrays(runner.params)
            add(embed_step, (embed, inp.tokens, inp.positions), dict(cfg=cfg), ("embed", shape.T), priority)
            x, ropes = jax.eval_shape(functools.partial(embed_step, cfg=cfg), embed, inp.tokens, inp.positions)
            add(layer_step, (runner.layer_params[0], runner.kv_cache, x, ropes, runner._layer_ids[0], inp.meta),
                dict(cfg=cfg, attention=runner.attention, q_block=shape.q_block), ("layer", shape), priority)
            add(rows_step, (x, inp.logits_indices), {}, ("rows", shape.T, shape.S), priority)
        else:
            add(forward_step, (runner.params, runner.kv_cache, inp),
                dict(graphdef=runner.graphdef, attention=runner.attention, q_block=shape.q_block,
                     unroll=runner.unroll), ("forward", shape), priority)
        if drafter is not None and drafter.model is not None:  # draft: the step's tokens through it too
            add(forward_step, (drafter.params, drafter.kv_cache, inp),
                dict(graphdef=drafter.model.graphdef, attention=runner.attention, q_block=shape.q_block),
                ("draft_forward", shape), priority)
        if runner.async_scheduling:
            src = np.zeros(shape.T, np.int32)
            add(resolve_tokens, (inp.tokens, src, jax.ShapeDtypeStruct((rc.seq_buckets[-1],), jnp.int32)), {},
                ("resolve", shape.T), priority)
        hidden = jax.ShapeDtypeStruct((shape.T, D), dtype)
        rows = np.zeros(shape.T, np.int32)
        add(prompt_logprobs_step, (runner.params, hidden, rows, rows), dict(graphdef=runner.graphdef, matmul=matmul),
            ("prompt_logprobs", shape.T), rare)
    for S in rc.seq_buckets:  # penalties / logprobs / grammar masks: the largest bucket only (see _sample)
        rows = jax.ShapeDtypeStruct((S, D), dtype)
        for variant in SAMPLER_VARIANTS:
            rare_variant = any(variant)
            if S != rc.seq_buckets[-1] and rare_variant:
                continue
            si = neutral_sampling_input(S, V, **_variant_kwargs(variant))
            add(sample_step, (runner.params, rows, si), dict(graphdef=runner.graphdef, pad_to=rc.seq_buckets[-1],
                                                                 matmul=matmul),
                ("sample", S, *variant), rare if rare_variant else 0)
            if rc.num_speculative_tokens:
                hidden = jax.ShapeDtypeStruct((verify_seqs(rc, S), D), dtype)
                trees = (runner.kv_cache, np.zeros(hidden.shape[0], np.int32)) if rc.draft_tree else ()
                add(verify_step, (runner.params, hidden, empty_verify_input(S, rc.num_speculative_tokens,
                                                                             rc.draft_tree), si, *trees),
                    dict(graphdef=runner.graphdef, matmul=matmul), ("verify", S, *variant), rare if rare_variant else 0)
        K = rc.num_speculative_tokens
        if drafter is not None and drafter.head is not None:  # eagle: after a sample step and a verify step
            i32 = jnp.int32
            kw = dict(graphdef=runner.graphdef, num_drafts=K, matmul=matmul,
                      tree=drafter.spec.draft_tree)  # (as head_drafts passes them)
            ctx = drafter.context_input([], {}, S)  # (a head that attends: the cache and where it reads)
            cache = (runner.kv_cache if ctx is not None else None, ctx)
            add(propose_step, (runner.params, drafter.head, rows,
                               jax.ShapeDtypeStruct((max(S, rc.seq_buckets[-1]),), i32), None, None, *cache), kw,
                ("propose", S), 0)  # (None passed as the runner passes it: jit keys on the arguments' structure)
            add(propose_step, (runner.params, drafter.head, jax.ShapeDtypeStruct((verify_seqs(rc, S), D), dtype),
                               jax.ShapeDtypeStruct((S, K + 1), i32), np.zeros((S, K + 1), np.int32),
                               jax.ShapeDtypeStruct((S,), i32), *cache), kw, ("propose_verify", S), 0)
    if drafter is not None and drafter.model is not None:  # draft: its k decode steps, every decode shape
        for shape in decode_shapes(rc):
            inp = empty_draft_inputs(shape, rc.num_speculative_tokens, rc.page_size, rc.pages_per_item)
            add(draft_propose_step, (drafter.params, drafter.kv_cache, inp),
                dict(graphdef=drafter.model.graphdef, attention=runner.attention), ("draft_propose", shape), 1)
    return [graph for _, _, graph in sorted(graphs, key=lambda g: g[:2])]

def empty_verify_input(S: int, K: int, trees: bool = False) -> VerifyInput:
    return build_verify_input([], S, K, trees)  # (no chunks: every row padding)


def warmup_by_running(runner, progress: bool) -> int:
    """Runs every step shape once on padding inputs (the sharded case: the graphs see the
    shardings real steps produce)."""
    rc, V = runner.rc, runner.config.vocab_size
    shapes = runner.all_step_shapes()
    it = shapes
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(shapes, desc="Compiling steps", unit="shape")
    count = 0
    D = runner.num_replicas  # data-parallel steps stack D replicas' inputs
    hidden, sample_rows = {}, {}
    for shape in it:
        inp = empty_model_input(shape, rc.page_size, rc.pages_per_item, trees=rc.draft_tree)
        if D > 1:
            inp = stack_model_inputs([inp] * D, shape.T)
        hidden[shape.T], rows = runner._forward(inp, shape)
        sample_rows[shape.S] = rows
        count += 1
    K = rc.num_speculative_tokens
    for S in rc.seq_buckets:
        for variant in SAMPLER_VARIANTS:
            si = neutral_sampling_input(S, V, **_variant_kwargs(variant))
            if D > 1:
                si = stack_sampling_inputs([si] * D, V)
            sampled, _ = runner._sample(sample_rows[S], si)
            jax.block_until_ready(sampled)
            count += 1
            if K:  # (one replica: speculative decoding runs without data parallelism)
                tokens, accepted, _, vi = runner._verify(hidden[verify_seqs(rc, S)],
                                                         empty_verify_input(S, K, rc.draft_tree), si,
                                                         np.zeros(verify_seqs(rc, S), np.int32))
                count += 1
                drafter = runner.drafter
                if drafter is not None and drafter.head is not None and not any(variant):
                    ctx = drafter.context_input([], {}, S)
                    jax.block_until_ready(drafter.head_drafts(runner.params, runner.graphdef,
                                                              hidden[verify_seqs(rc, S)], tokens, vi, accepted,
                                                              runner.kv_cache, ctx))
                    jax.block_until_ready(drafter.head_drafts(runner.params, runner.graphdef, sample_rows[S], sampled,
                                                              kv_cache=runner.kv_cache, context=ctx))
                    count += 2
    for T, h in hidden.items():
        rows = np.zeros(T * D, np.int32)
        jax.block_until_ready(runner._prompt_logprobs(h, rows, rows))
        count += 1
    jax.block_until_ready(runner.kv_cache)
    return count
