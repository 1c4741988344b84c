"""Runner: a SchedulerOutput -> padded device inputs -> jit forward + jit sampler -> tokens.

The SchedulerOutput is all the runner sees of the scheduler: a newly admitted request's data
crosses once (`SchedulerOutput.new_requests`), the runner keeps it (`CachedRequest`: params, seed,
token history it extends as it samples) until the scheduler lists the request in `finished_ids`.
Shapes come from `buckets`, inputs from `inputs`, the compiled graphs from `steps` (shared by every
runner of the same model and shapes in the process).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.config import ModelConfig
from jaxinfer.model import params_for_layer_loop, unstack_layers
from jaxinfer.paged_attention import PagedKVCache
from jaxinfer.runner.buckets import RunnerConfig, StepShape, all_step_shapes, step_shape
from jaxinfer.runner.inputs import (CachedRequest, ModelInput, SamplingInput, build_model_input,
                                    build_sampling_input, empty_model_input, neutral_sampling_input,
                                    prompt_logprob_rows, stack_model_inputs, stack_sampling_inputs)
from jaxinfer.runner.steps import (AttentionSpec, embed_step, forward_step, layer_step, prompt_logprobs_step,
                                   rows_step, sample_step)
from jaxinfer.sampling_params import MAX_LOGPROBS
from jaxinfer.scheduler import SchedulerOutput
from pallas_kernels import ops

logger = logging.getLogger(__name__)

# The sampler graphs a step can need besides the plain one: (penalties, logprobs) combinations.
SAMPLER_VARIANTS = ((False, 0), (True, 0), (False, MAX_LOGPROBS), (True, MAX_LOGPROBS))


@dataclasses.dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None  # under the raw distribution, when asked for
    top_logprobs: list[tuple[int, float]] | None = None  # best first


@dataclasses.dataclass
class PromptLogprob:
    position: int  # the prompt token this is the log-probability of
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]


@dataclasses.dataclass
class StepResult:
    sampled: dict[str, SampledToken]
    prompt_logprobs: dict[str, list[PromptLogprob]]
    device_seconds: float = 0.0  # time waiting for the device (the rest of the step is host work)
    start_time: float = 0.0  # time.monotonic() when the step began

    @property
    def token_ids(self) -> dict[str, list[int]]:
        """Request id -> the tokens it sampled this step (what Scheduler.update takes)."""
        return {rid: [s.token_id] for rid, s in self.sampled.items()}


@dataclasses.dataclass
class StepPlan:
    """Everything the device part of a step needs (host numpy arrays): what process 0 sends to
    the others in a multi-host run."""

    shape: StepShape
    model_input: ModelInput
    sampling_input: SamplingInput
    prompt_rows: np.ndarray  # [R] int32 hidden-state rows whose next-token logprobs are wanted
    prompt_targets: np.ndarray  # [R] int32 the prompt token each row predicts


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
        time at the scanned loop's compile time; docs/ARCHITECTURE.md decision 48).
    """

    def __init__(self, config: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State, runner_config: RunnerConfig,
                 *, eos_token_ids: Iterable[int] = (), mesh=None, layer_loop: str = "model"):
        if layer_loop not in ("model", "per_layer"):
            raise ValueError(f"layer_loop must be 'model' or 'per_layer', got {layer_loop!r}")
        self.config = config
        self.rc = runner_config
        self.graphdef = graphdef
        self.eos_token_ids = tuple(eos_token_ids)
        self.mesh = mesh
        self.num_replicas = 1 if mesh is None else mesh.shape["data"]
        self.step_hook = None  # called with each StepPlan before it runs (multi-host broadcast)
        self.requests: dict[str, CachedRequest] = {}
        self.attention = AttentionSpec(backend=runner_config.attention_backend,
                                       max_prefill_seqs=runner_config.max_prefill_seqs, mesh=mesh)
        self.layer_loop = layer_loop
        self.params = unstack_layers(params) if layer_loop == "per_layer" else params_for_layer_loop(config, params)
        make_cache = functools.partial(
            PagedKVCache.zeros, num_layers=config.num_layers, num_pages=runner_config.num_pages,
            page_size=runner_config.page_size, num_kv_heads=config.num_kv_heads,
            head_dim=ops.kv_cache_head_dim(config.head_dim, runner_config.attention_backend),
            dtype=jnp.dtype(config.dtype))
        if mesh is None:
            self.kv_cache = make_cache()
        else:  # parameters and cache placed by the sharding rules; the cache is allocated sharded
            from sharding.rules import kv_cache_sharding, shard_params

            self.params = shard_params(self.params, mesh)
            self.kv_cache = jax.jit(make_cache, out_shardings=kv_cache_sharding(jax.eval_shape(make_cache), mesh))()
        self.layer_params = []  # per_layer: {name: layer i's array}, one dict per layer
        if layer_loop == "per_layer":
            layers = {name: var.get_value() for name, var in nnx.to_flat_state(self.params["layers"])}
            self.layer_params = [{name[-1]: arrays[i] for name, arrays in layers.items()}
                                 for i in range(config.num_layers)]
        self._layer_ids = [jnp.int32(i) for i in range(config.num_layers)]  # on the device once

    # ---- the compiled steps (shared: see steps.py) ------------------------------------------------

    def _forward(self, inp: ModelInput, q_block: int):
        if self.layer_loop == "per_layer":
            cfg = self.config
            x, ropes = embed_step(self.params["embed"].get_value(), inp.tokens, inp.positions, cfg=cfg)
            meta = jax.device_put(inp.meta)  # once, not once per layer
            for layer, p in zip(self._layer_ids, self.layer_params):
                x, self.kv_cache = layer_step(p, self.kv_cache, x, ropes, layer, meta, cfg=cfg,
                                              attention=self.attention, q_block=q_block)
            return rows_step(x, inp.logits_indices)
        hidden, rows, self.kv_cache = forward_step(self.params, self.kv_cache, inp, graphdef=self.graphdef,
                                                   attention=self.attention, q_block=q_block)
        return hidden, rows

    def _sample(self, rows, si: SamplingInput):
        S = rows.shape[0]
        if self.mesh is None and (si.penalties is not None or si.num_logprobs) and S < self.rc.seq_buckets[-1]:
            # Penalties and logprobs are compiled for the largest sequence bucket only (start-up):
            # pad the rows, sample, cut the padding off.
            # The rows are a few KB: padded on the host (a device pad or slice would be a graph of
            # its own); the caller reads the first S rows of the result.
            pad = self.rc.seq_buckets[-1] - S
            rows = np.pad(np.asarray(rows), ((0, pad), (0, 0)))
            si = jax.tree.map(lambda a: np.pad(a, [(0, pad)] + [(0, 0)] * (np.ndim(a) - 1)), si)
        return sample_step(self.params, rows, si, graphdef=self.graphdef)

    def _prompt_logprobs(self, hidden, rows, targets):
        return prompt_logprobs_step(self.params, hidden, rows, targets, graphdef=self.graphdef)

    # ---- shapes -------------------------------------------------------------------------------

    def step_shape(self, out: SchedulerOutput) -> StepShape:
        return step_shape(self.rc, getattr(out, "replicas", (out,)))

    def all_step_shapes(self) -> list[StepShape]:
        return all_step_shapes(self.rc)

    # ---- per-request state --------------------------------------------------------------------

    def _update_states(self, out: SchedulerOutput) -> None:
        for rid in out.finished_ids:
            self.requests.pop(rid, None)
        for new in out.new_requests:
            self.requests[new.request_id] = CachedRequest(new.request_id, list(new.prompt_token_ids),
                                                          new.sampling_params, new.seed)

    # ---- running ------------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Runs one step: the sampled token of every chunk that samples (and logprobs). `out` may
        be a `data_parallel.DataParallelOutput`: every replica's chunks run in one step."""
        start = time.monotonic()
        self._update_states(out)
        if out.is_empty:
            return StepResult({}, {}, start_time=start)
        outs = getattr(out, "replicas", (out,))
        shape = self.step_shape(out)
        rc, V = self.rc, self.config.vocab_size
        inputs, sampling, rows, targets, owners, chunk_rows = [], [], [], [], [], []
        for r, o in enumerate(outs):  # replica r owns rows r*T.. of the tokens and r*S.. of the sequences
            inputs.append(build_model_input(o.chunks, shape, rc.page_size, rc.pages_per_item))
            sampling.append(build_sampling_input(o.chunks, self.requests, shape.S, V, self.eos_token_ids))
            rr, tt, oo = prompt_logprob_rows(o.chunks, self.requests)
            rows += [x + r * shape.T for x in rr]
            targets += tt
            owners += oo
            chunk_rows += [(chunk, r * shape.S + s) for s, chunk in enumerate(o.chunks)]
        if len(outs) == 1:
            model_input, sampling_input = inputs[0], sampling[0]
        else:
            model_input = stack_model_inputs(inputs, shape.T)
            sampling_input = stack_sampling_inputs(sampling, V)
        plan = StepPlan(shape=shape, model_input=model_input, sampling_input=sampling_input,
                        prompt_rows=np.asarray(rows, np.int32), prompt_targets=np.asarray(targets, np.int32))
        if self.step_hook is not None:  # multi-host: the other processes run the same plan
            self.step_hook(plan)
        tokens, lps, prompt_lps, device_seconds = self.run_plan(plan)
        sampled = {}
        for chunk, s in chunk_rows:
            if not chunk.samples:
                continue
            request = self.requests[chunk.request_id]
            result = SampledToken(int(tokens[s]))
            request.output_token_ids.append(result.token_id)
            n = request.params.logprobs
            if n is not None:
                result.logprob = float(lps[0][s])
                result.top_logprobs = [(int(i), float(v)) for i, v in zip(lps[1][s, :n], lps[2][s, :n])]
            sampled[chunk.request_id] = result
        prompt = {}
        for r, ((rid, pos), target) in enumerate(zip(owners, targets)):
            n = self.requests[rid].params.prompt_logprobs
            prompt.setdefault(rid, []).append(PromptLogprob(
                pos, target, float(prompt_lps[0][r]),
                [(int(i), float(v)) for i, v in zip(prompt_lps[1][r, :n], prompt_lps[2][r, :n])]))
        return StepResult(sampled, prompt, device_seconds, start)

    def run_plan(self, plan: StepPlan):
        """The device part of a step (every process of a multi-host run executes it on the same
        plan): forward, sample, prompt logprobs -> (tokens, logprobs, prompt logprobs, seconds
        spent waiting for the device), as numpy arrays."""
        hidden, rows = self._forward(plan.model_input, plan.shape.q_block)
        tokens, lps = self._sample(rows, plan.sampling_input)  # may be padded past S rows (see _sample)
        prompt_lps = None
        if len(plan.prompt_rows):
            pad = (0, plan.model_input.tokens.shape[1] - len(plan.prompt_rows))  # one graph per hidden shape
            prompt_lps = self._prompt_logprobs(hidden, np.pad(plan.prompt_rows, pad), np.pad(plan.prompt_targets, pad))
        start = time.perf_counter()
        tokens = np.asarray(tokens)
        if lps is not None:
            lps = [np.asarray(a) for a in lps]
        if prompt_lps is not None:
            prompt_lps = [np.asarray(a) for a in prompt_lps]
        return tokens, lps, prompt_lps, time.perf_counter() - start

    def warmup(self, progress: bool = False, threads: int = 1) -> int:
        """Compiles every graph a step can need (every step shape, sampler variant and prompt-logprob
        shape); returns how many. Without a mesh the graphs are compiled ahead of time from
        abstract inputs, `threads` at once (1: on the calling thread; the server asks for one per
        core), and nothing runs; with a mesh each shape runs once on padding inputs."""
        if self.mesh is not None:
            return self._warmup_by_running(progress)
        graphs = self._aot_graphs()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(graphs), desc="Compiling steps", unit="graph")
        def compile_graph(g):
            g[0].lower(*g[1], **g[2]).compile()

        if threads <= 1:
            for g in graphs:
                compile_graph(g)
                if bar is not None:
                    bar.update(1)
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
                for f in concurrent.futures.as_completed([pool.submit(compile_graph, g) for g in graphs]):
                    f.result()
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return len(graphs)

    def _aot_graphs(self) -> list[tuple]:
        """(jitted function, args, kwargs) of every graph, args abstract where they are device
        results (hidden states, sampled rows), real where they are what a step passes."""
        rc, cfg, V = self.rc, self.config, self.config.vocab_size
        dtype, D = jnp.dtype(cfg.dtype), cfg.hidden_size
        graphs, seen = [], set()

        def add(fn, args, kwargs, key):
            if key not in seen:
                seen.add(key)
                graphs.append((fn, args, kwargs))

        for shape in self.all_step_shapes():
            inp = empty_model_input(shape, rc.page_size, rc.pages_per_item)
            if self.layer_loop == "per_layer":
                embed = self.params["embed"].get_value()
                add(embed_step, (embed, inp.tokens, inp.positions), dict(cfg=cfg), ("embed", shape.T))
                x, ropes = jax.eval_shape(functools.partial(embed_step, cfg=cfg), embed, inp.tokens, inp.positions)
                add(layer_step, (self.layer_params[0], self.kv_cache, x, ropes, self._layer_ids[0], inp.meta),
                    dict(cfg=cfg, attention=self.attention, q_block=shape.q_block), ("layer", shape))
                add(rows_step, (x, inp.logits_indices), {}, ("rows", shape.T, shape.S))
            else:
                add(forward_step, (self.params, self.kv_cache, inp),
                    dict(graphdef=self.graphdef, attention=self.attention, q_block=shape.q_block), ("forward", shape))
            hidden = jax.ShapeDtypeStruct((shape.T, D), dtype)
            rows = np.zeros(shape.T, np.int32)
            add(prompt_logprobs_step, (self.params, hidden, rows, rows), dict(graphdef=self.graphdef),
                ("prompt_logprobs", shape.T))
        for S in rc.seq_buckets:  # penalties / logprobs: the largest bucket only (see _sample)
            rows = jax.ShapeDtypeStruct((S, D), dtype)
            for with_penalties, num_logprobs in SAMPLER_VARIANTS:
                if S == rc.seq_buckets[-1] or not (with_penalties or num_logprobs):
                    si = neutral_sampling_input(S, V, with_penalties=with_penalties, num_logprobs=num_logprobs)
                    add(sample_step, (self.params, rows, si), dict(graphdef=self.graphdef),
                        ("sample", S, with_penalties, num_logprobs))
        return graphs

    def _warmup_by_running(self, progress: bool) -> int:
        """Runs every step shape once on padding inputs (the sharded case: the graphs see the
        shardings real steps produce)."""
        rc, V = self.rc, self.config.vocab_size
        shapes = self.all_step_shapes()
        it = shapes
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(shapes, desc="Compiling steps", unit="shape")
        count = 0
        D = self.num_replicas  # data-parallel steps stack D replicas' inputs
        hidden, sample_rows = {}, {}
        for shape in it:
            inp = empty_model_input(shape, rc.page_size, rc.pages_per_item)
            if D > 1:
                inp = stack_model_inputs([inp] * D, shape.T)
            hidden[shape.T], sample_rows[shape.S] = self._forward(inp, shape.q_block)
            count += 1
        for S in rc.seq_buckets:
            for with_penalties, num_logprobs in SAMPLER_VARIANTS:
                si = neutral_sampling_input(S, V, with_penalties=with_penalties, num_logprobs=num_logprobs)
                if D > 1:
                    si = stack_sampling_inputs([si] * D, V)
                jax.block_until_ready(self._sample(sample_rows[S], si))
                count += 1
        for T, h in hidden.items():
            rows = np.zeros(T * D, np.int32)
            jax.block_until_ready(self._prompt_logprobs(h, rows, rows))
            count += 1
        jax.block_until_ready(self.kv_cache)
        return count
