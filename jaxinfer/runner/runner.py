"""Runner: a SchedulerOutput -> padded device inputs -> jit forward + jit sampler -> tokens.

The SchedulerOutput is all the runner sees of the scheduler: a newly admitted request's data
crosses once (`SchedulerOutput.new_requests`), the runner keeps it (`CachedRequest`: params, seed,
token history it extends as it samples, page table each chunk's new pages extend) until the
scheduler lists the request in `finished_ids`.

    execute(out)                              one step: collect(submit(out)); with async scheduling
                                              submit(out), then collect the step submitted before
    submit(out)  -> InFlightStep              builds the inputs and dispatches the step; returns at
                                              once (JAX runs it asynchronously)
    collect(step) -> StepResult               waits for its tokens, extends the histories

With async scheduling step N + 1 is submitted before step N is collected: the token step N is
sampling for a decode is read from step N's device output inside step N + 1 (`resolve_tokens`),
so the host never waits for it before dispatching.
Shapes come from `buckets`, the per-request state from `requests`, a step's host arrays from `plan`
(built by `inputs`), the compiled graphs from `steps` (shared by every runner of the same model and
shapes in the process), the results' reading from `results`.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.config import ModelConfig
from jaxinfer.model import embedding_arrays, params_for_layer_loop, unstack_layers
from jaxinfer.paged_attention import PagedKVCache
from jaxinfer.runner.buckets import RunnerConfig, StepShape, all_step_shapes, one_graph, step_shape
from jaxinfer.runner.drafter import Drafter
from jaxinfer.runner.inputs import ModelInput, SamplingInput, VerifyInput, build_bitmask, pad_rows
from jaxinfer.runner.plan import build_plan
from jaxinfer.runner.requests import CachedRequest, update_requests
from jaxinfer.runner.results import InFlightStep, StepPlan, StepResult, prompt_logprobs, sampled_tokens
from jaxinfer.runner.steps import (AttentionSpec, copy_pages, embed_step, forward_step, layer_step,
                                   prompt_logprobs_step, resolve_tokens, rows_step, sample_step, verify_step)
from jaxinfer.scheduler_output import SchedulerOutput
from jaxinfer.speculative import SpeculativeConfig
from jaxinfer.speculative.draft import DraftModel
from jaxinfer.speculative.eagle import DraftHead
from jaxinfer.speculative.proposers import next_drafts
from pallas_kernels import ops

logger = logging.getLogger(__name__)


class Runner:
    """Owns the device KV cache, the per-request state it needs to build inputs, and runs steps.

    Args:
      config: the model's config.
      graphdef, params: the NNX model, split (`jaxinfer.loader.LoadedModel`).
      runner_config: cache geometry and shape buckets.
      eos_token_ids: tokens suppressed until a request's min_tokens are generated.
      mesh: shard parameters and cache over it (`sharding/`), else one device.
      layer_loop: "model": one compiled graph per step, looping over the layers as the model is
        configured (scanned or unrolled); "per_layer": one compiled graph of a single layer, run
        once per layer from the host on that layer's own weight arrays (the unrolled loop's step
        time at the scanned loop's compile time; decision 48); "hybrid": per_layer for steps with
        prefill, one unrolled graph for decode / verify steps of <= `buckets.HYBRID_ROWS` rows (80).
      async_scheduling: the engine submits a step before collecting the previous one (one device,
        no mesh): warm-up also compiles `resolve_tokens`.
      speculative: speculative decoding (synchronous steps, one replica): after each step the
        runner proposes the next step's drafts for every request that sampled
        (`StepResult.draft_token_ids`); steps with drafts run `verify_step`.
      draft_head: method "eagle": the loaded head (`eagle.load_head`), proposing on the device right
        after each step's sampler (`propose_step`), reading the cache if it attends.
      draft_model: method "draft": the loaded draft model (`draft.load_draft`), run over every step's
        tokens into its own cache (the target's page tables), then k drafts (`draft_propose_step`).
      grammars: the `structured_output.GrammarCompiler` that makes each sample's mask state
        (structured outputs, thinking budgets); None: requests with either are refused.
    """

    def __init__(self, config: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State, runner_config: RunnerConfig,
                 *, eos_token_ids: Iterable[int] = (), mesh=None, layer_loop: str = "model",
                 async_scheduling: bool = False, speculative: SpeculativeConfig | None = None,
                 draft_head: DraftHead | None = None, draft_model: DraftModel | None = None, grammars=None):
        if layer_loop not in ("model", "per_layer", "hybrid"):
            raise ValueError(f"layer_loop must be 'model', 'per_layer' or 'hybrid', got {layer_loop!r}")
        self.config, self.rc, self.graphdef, self.mesh = config, runner_config, graphdef, mesh
        self.eos_token_ids = tuple(eos_token_ids)
        self.num_replicas = 1 if mesh is None else mesh.shape["data"]
        self.step_hook = None  # called with each StepPlan before it runs (multi-host broadcast)
        self.hidden_sink = None  # (request id, hidden [D]) per sampler row, not verify's (async: dropped rows too)
        self.requests: dict[str, CachedRequest] = {}
        self.grammars = grammars
        self._in_flight: InFlightStep | None = None  # the last submitted step, until collected
        self.attention = AttentionSpec(backend=runner_config.attention_backend,
                                       max_prefill_seqs=runner_config.max_prefill_seqs, mesh=mesh)
        self.layer_loop, self.unroll = layer_loop, layer_loop == "hybrid"  # (unroll: forward_step's static)
        if async_scheduling and mesh is not None:
            raise ValueError("async scheduling runs on one device without a mesh")
        self.async_scheduling = async_scheduling  # warm-up compiles resolve_tokens
        rc = self.rc
        tree = speculative is not None and isinstance(speculative.draft_tree, tuple)
        if speculative is not None and (async_scheduling or (rc.num_speculative_tokens, rc.draft_tree)
                                        != (speculative.num_speculative_tokens, tree)):
            raise ValueError("speculative decoding runs synchronous steps, RunnerConfig's num_speculative_tokens and "
                             "draft_tree as SpeculativeConfig's")
        self.speculative = speculative
        self.params = unstack_layers(params) if layer_loop != "model" else params_for_layer_loop(config, params)
        make_cache = functools.partial(self._make_cache, config)
        self.kv_cache = make_cache() if mesh is None else None
        if mesh is not None:  # parameters and cache placed by the sharding rules; the cache is allocated sharded
            from sharding.rules import kv_cache_sharding, shard_params

            self.params = shard_params(self.params, mesh)
            self.kv_cache = jax.jit(make_cache, out_shardings=kv_cache_sharding(jax.eval_shape(make_cache), mesh))()
        self.layer_params = []  # per_layer / hybrid: {name: layer i's array}, one dict per layer
        if layer_loop != "model":
            layers = {name: var.get_value() for name, var in nnx.to_flat_state(self.params["layers"])}
            self.layer_params = [{name[-1]: arrays[i] for name, arrays in layers.items()}
                                 for i in range(config.num_layers)]
        self._layer_ids = [jnp.int32(i) for i in range(config.num_layers)]  # on the device once
        self.drafter = None if speculative is None else Drafter(  # speculative decoding's proposers (`drafter`)
            speculative, runner_config, self.attention, draft_head=draft_head, draft_model=draft_model, mesh=mesh,
            make_cache=self._make_cache)
        if speculative is None and (draft_head is not None or draft_model is not None):
            raise ValueError("a draft head or draft model goes with a speculative config")

    def _make_cache(self, config: ModelConfig) -> PagedKVCache:
        rc = self.rc
        return PagedKVCache.zeros(num_layers=config.num_layers, num_pages=rc.num_pages, page_size=rc.page_size,
                                  num_kv_heads=config.num_kv_heads,
                                  head_dim=ops.kv_cache_head_dim(config.head_dim, rc.attention_backend),
                                  dtype=jnp.dtype(config.dtype), kv_cache_dtype=rc.kv_cache_dtype)

    # ---- the compiled steps (shared: see steps.py) ------------------------------------------------

    def _forward(self, inp: ModelInput, shape: StepShape):
        if not one_graph(self.layer_loop, shape):
            cfg = self.config
            x, ropes = embed_step(embedding_arrays(self.params), inp.tokens, inp.positions, cfg=cfg)
            meta = jax.device_put(inp.meta)  # once, not once per layer
            for layer, p in zip(self._layer_ids, self.layer_params):
                x, self.kv_cache = layer_step(p, self.kv_cache, x, ropes, layer, meta, cfg=cfg,
                                              attention=self.attention, q_block=shape.q_block)
            return rows_step(x, inp.logits_indices)
        hidden, rows, self.kv_cache = forward_step(self.params, self.kv_cache, inp, graphdef=self.graphdef,
                                                   attention=self.attention, q_block=shape.q_block,
                                                   unroll=self.unroll)
        return hidden, rows

    def _sample(self, rows, si: SamplingInput):
        S = rows.shape[0]
        pad_to = self.rc.seq_buckets[-1] if self.mesh is None else 0  # one token length for resolve_tokens
        if self.mesh is None and si.largest_bucket_only and S < self.rc.seq_buckets[-1]:
            # Penalties, logprobs and grammar masks are compiled for the largest sequence bucket only (start-up):
            # pad the rows (a few KB: on the host; a device pad would be a graph of its own), sample; the
            # caller reads the first S rows of the result.
            rows, si = pad_rows((rows, si), self.rc.seq_buckets[-1] - S)
        return sample_step(self.params, rows, si, graphdef=self.graphdef, pad_to=pad_to,
                           matmul=self.attention.matmul_backend)

    def _verify(self, hidden, vi: VerifyInput, si: SamplingInput, slot_mapping=None):
        """-> (tokens, num_accepted, logprobs, the VerifyInput used: padded like the sampler's rows; with
        draft trees its rows are the accepted paths', whose keys and values moved in the cache)."""
        if si.largest_bucket_only and vi.num_drafts.shape[0] < self.rc.seq_buckets[-1]:  # as in _sample
            vi, si = pad_rows((vi, si), self.rc.seq_buckets[-1] - vi.num_drafts.shape[0])
        trees = (self.kv_cache, slot_mapping) if vi.parents is not None else ()
        tokens, accepted, lps, rows, kv_cache = verify_step(self.params, hidden, vi, si, *trees, graphdef=self.graphdef,
                                                            matmul=self.attention.matmul_backend)
        self.kv_cache = kv_cache if trees else self.kv_cache
        return tokens, accepted, lps, vi.replace(rows=rows)

    def _prompt_logprobs(self, hidden, rows, targets):
        return prompt_logprobs_step(self.params, hidden, rows, targets, graphdef=self.graphdef,
                                    matmul=self.attention.matmul_backend)

    # ---- shapes -------------------------------------------------------------------------------

    def step_shape(self, out: SchedulerOutput) -> StepShape:
        return step_shape(self.rc, getattr(out, "replicas", (out,)))

    def all_step_shapes(self) -> list[StepShape]:
        return all_step_shapes(self.rc)

    # ---- running ------------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput) -> StepResult | None:
        """Runs one step: the sampled token of every chunk that samples (and logprobs). `out` may
        be a `data_parallel.DataParallelOutput`: every replica's chunks run in one step.

        With async scheduling `out` is dispatched and the results returned are those of the step
        dispatched before it (`StepResult.out` says which); None when there was none (the first
        step of a run). A step that raises leaves nothing in flight."""
        previous = self._in_flight
        try:
            submitted = self.submit(out)
            if not self.async_scheduling:
                return self.collect(submitted)  # (an empty one still tells the runner who ended or was preempted)
            if previous is not None:
                return self.collect(previous)
            return self.collect(submitted) if out.is_empty else None
        except BaseException:
            self._in_flight = None
            raise

    @property
    def in_flight(self) -> SchedulerOutput | None:  # the step dispatched and not yet collected, if any
        return self._in_flight.out if self._in_flight is not None else None

    def submit(self, out: SchedulerOutput) -> InFlightStep:
        """Builds the step's inputs and dispatches it without waiting for the device. A step
        already in flight may still be sampling some of its decodes' input tokens: they are read
        from its device output. Its results come from `collect`."""
        step = InFlightStep(out, time.monotonic())
        update_requests(self.requests, out, self.grammars, self.eos_token_ids)
        self._copy_pages(out)
        if out.is_empty:
            return step
        in_flight = self._in_flight if self._in_flight is not None and self._in_flight.result is None else None
        if in_flight is not None and any(self.requests[c.request_id].params.needs_penalties
                                         and c.request_id in in_flight.rows for c in out.chunks):
            self.collect(in_flight)  # penalties count every output token: wait for the one in flight
            in_flight = None
        # A grammar's next mask needs the token the step in flight is sampling for its request: this
        # step's forward is dispatched first and the mask built while it runs (`_dispatch`).
        defer_masks = in_flight is not None and any(c.samples and self.requests[c.request_id].grammar is not None
                                                    and c.request_id in in_flight.rows for c in out.chunks)
        pending = None  # request id -> its row in the step in flight's tokens (the same request, not a reused id)
        if in_flight is not None:
            pending = {rid: row for rid, (req, row) in in_flight.rows.items() if self.requests.get(rid) is req}
        plan, S = build_plan(out, self.requests, self.rc, self.step_shape(out), self.config.vocab_size,
                             self.eos_token_ids, step, pending, with_bitmask=not defer_masks)
        # eagle proposes for every sampler row, unless as many running requests turn drafts off
        propose = self.drafter is not None and self.drafter.proposes_on_device(len(out.chunks))
        if propose:  # (a head that attends: where it reads the cache)
            plan.head_context = self.drafter.context_input(out.chunks, self.requests, S)
        if self.step_hook is not None:  # multi-host: the other processes run the same plan
            if plan.token_src is not None:
                raise RuntimeError("async scheduling runs in one process: the plan's tokens must all be known")
            self.step_hook(plan)
        # draft: the draft model reads the step's tokens only in a step after which it proposes
        draft_forward = self.drafter is not None and self.drafter.track(out.chunks, self.requests)
        with_masks = None
        if defer_masks:
            def with_masks(si):
                self.collect(in_flight)  # (its results stay cached for the caller)
                return si.replace(bitmask=build_bitmask(out.chunks, self.requests, S, self.config.vocab_size))
        step.tokens, step.logprobs, step.prompt_logprobs, step.num_accepted, step.drafts, hidden = self._dispatch(
            plan, in_flight.tokens if in_flight is not None else None, propose, with_masks, draft_forward)
        step.hidden = hidden if self.hidden_sink is not None else None
        self._in_flight = step
        return step

    def _copy_pages(self, out: SchedulerOutput) -> None:
        """Beam search's page copies, before the step that writes into the copies (replica r's
        local page p is page r * pages-per-replica + p of the stacked cache)."""
        per_replica = self.rc.num_pages // self.num_replicas
        pairs = [(src + r * per_replica, dst + r * per_replica)
                 for r, o in enumerate(getattr(out, "replicas", (out,))) for src, dst in o.page_copies]
        if not pairs:
            return
        if self.step_hook is not None:
            raise RuntimeError("beam search runs in one process")
        n = max(4, 1 << (len(pairs) - 1).bit_length())  # a few padded sizes: a few graphs
        src, dst = (np.asarray([p[i] for p in pairs] + [0] * (n - len(pairs)), np.int32) for i in (0, 1))
        self.kv_cache = copy_pages(self.kv_cache, src, dst)
        if self.drafter is not None and self.drafter.kv_cache is not None:  # a draft model's pages go along
            self.drafter.kv_cache = copy_pages(self.drafter.kv_cache, src, dst)

    def collect(self, step: InFlightStep) -> StepResult:
        """Waits for a submitted step's results, appends each sampled token to its request's
        history and returns them (again, if already collected)."""
        if step.result is not None:
            return step.result
        if step.tokens is None:
            step.result = StepResult(step.out, {}, {}, start_time=step.start_time)
            return step.result
        start = time.perf_counter()
        tokens = np.asarray(step.tokens)
        lps = None if step.logprobs is None else [np.asarray(a) for a in step.logprobs]
        prompt_lps = None if step.prompt_logprobs is None else [np.asarray(a) for a in step.prompt_logprobs]
        accepted = None if step.num_accepted is None else np.asarray(step.num_accepted)
        device_drafts = None if step.drafts is None else np.asarray(step.drafts)
        hidden = None if step.hidden is None or self.hidden_sink is None else np.asarray(step.hidden)
        device_seconds = time.perf_counter() - start
        sampled, candidates = sampled_tokens(step.rows, tokens, lps, accepted), {}
        for rid, results in sampled.items():
            request = step.rows[rid][0]
            if hidden is not None:  # (before beam search's continue: its rows sampled too)
                self.hidden_sink(rid, hidden[step.rows[rid][1]])
            if request.params.use_beam_search:  # the search picks the beam's token (`beam_forks`)
                candidates[rid] = results[0].top_logprobs
                continue
            request.token_ids += [r.token_id for r in results]  # (a request finished since has no one reading it)
            if request.grammar is not None and not request.grammar.accept([r.token_id for r in results]):
                logger.warning("request %s: its grammar refused a sampled token (%s); only end-of-sequence "
                               "is allowed from here", rid, request.grammar.error)
        prompt = prompt_logprobs(step.prompt_owners, step.prompt_targets, prompt_lps)
        drafts = {}
        if self.drafter is not None:
            drafts = next_drafts(self.speculative, step.rows,
                                 self.drafter.proposals(step.rows, len(step.out.chunks), device_drafts))
        step.result = StepResult(step.out, sampled, prompt, device_seconds, step.start_time, drafts, candidates)
        step.tokens = step.logprobs = step.prompt_logprobs = step.num_accepted = step.drafts = step.hidden = None
        if self._in_flight is step:
            self._in_flight = None
        return step.result

    def _dispatch(self, plan: StepPlan, in_flight_tokens=None, propose: bool = False, with_masks=None,
                  draft_forward: bool = False):
        """Dispatches the device part of a step (forward, sample or verify, prompt logprobs, and with
        `propose` the draft head's proposals) without waiting: device arrays (tokens, logprobs,
        prompt logprobs, drafts accepted or None, the draft head's next drafts or None, the sampler
        rows' hidden states [S, D] or None after a verify step).
        `with_masks`: called on the sampling input once the forward is dispatched, it returns the
        input with its grammar masks (async scheduling: they wait for the step in flight).
        `draft_forward`: the draft model's forward over the step's tokens too (method "draft")."""
        inp = plan.model_input
        if plan.token_src is not None:
            inp = inp.replace(tokens=resolve_tokens(inp.tokens, plan.token_src, in_flight_tokens))
        hidden, rows = self._forward(inp, plan.shape)
        if draft_forward:
            self.drafter.forward(inp, plan.shape.q_block)
        num_accepted = drafts = None
        si = plan.sampling_input if with_masks is None else with_masks(plan.sampling_input)
        if plan.verify is not None:
            tokens, num_accepted, lps, vi = self._verify(hidden, plan.verify, si, inp.meta.slot_mapping)
            if propose:
                drafts = self.drafter.head_drafts(self.params, self.graphdef, hidden, tokens, vi, num_accepted,
                                                  self.kv_cache, plan.head_context)  # (after a tree's moves)
        else:
            tokens, lps = self._sample(rows, si)  # padded past S rows (see _sample)
            if propose:
                drafts = self.drafter.head_drafts(self.params, self.graphdef, rows, tokens, None, None, self.kv_cache,
                                                  plan.head_context)
        prompt_lps = None
        if len(plan.prompt_rows):
            pad = (0, plan.model_input.tokens.shape[1] - len(plan.prompt_rows))  # one graph per hidden shape
            prompt_lps = self._prompt_logprobs(hidden, np.pad(plan.prompt_rows, pad), np.pad(plan.prompt_targets, pad))
        return tokens, lps, prompt_lps, num_accepted, drafts, rows if plan.verify is None else None

    def run_plan(self, plan: StepPlan):
        """The device part of a step (every process of a multi-host run executes it on the same
        plan): forward, sample, prompt logprobs -> (tokens, logprobs, prompt logprobs, seconds
        spent waiting for the device), as numpy arrays."""
        tokens, lps, prompt_lps, *_ = self._dispatch(plan)
        start = time.perf_counter()
        tokens = np.asarray(tokens)
        if lps is not None:
            lps = [np.asarray(a) for a in lps]
        if prompt_lps is not None:
            prompt_lps = [np.asarray(a) for a in prompt_lps]
        return tokens, lps, prompt_lps, time.perf_counter() - start

    def warmup(self, progress: bool = False, threads: int = 1, cancel=None) -> int:
        """Compiles every graph a step can need; returns how many (`runner.warmup`)."""
        from jaxinfer.runner.warmup import warmup

        return warmup(self, progress=progress, threads=threads, cancel=cancel)
