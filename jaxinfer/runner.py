"""Runner: a SchedulerOutput -> padded device inputs -> jit forward + jit sampler -> tokens.

    SchedulerOutput.chunks  a: 6 tokens @0 | b: 1 token @9 | c: 4 tokens @0     (3 sequences)
    ModelInput.tokens [1, T] a a a a a a b c c c c 0 0 0 0 0                   (T padded to a bucket)
    slot_mapping      [T]    a's slots ... | padding -> null page 0
    page_table        [S, W] W = the page-table width bucket covering the longest sequence
    SamplingInput.logits_indices [S]  last token of each chunk (only chunks that sample use it)

Two kinds of step, every shape compiled at warm-up, none after:

    decode step  every chunk is one token: T = S = a sequence bucket; on the reference backend
                 attention over a flat list of (sequence, page) items, I = an item bucket >= the
                 pages of all sequences; on the Pallas kernels the ragged kernel with one query
                 row per block and a page table of width W (I = 0).
    mixed step   prefill chunks (and decodes): T = a token bucket, S = the largest sequence
                 bucket, page table W = a width bucket; decodes attend per token, prefill chunks
                 in query blocks of up to `q_block` rows.

The forward step (donating the KV cache) returns hidden states that stay on the device; a small
jit sampler turns the sampled rows into tokens (and logprobs), and another gives prompt logprobs
when a request asks for them. Splitting them keeps the big graph free of sampling options.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import time
from typing import Iterable, Mapping, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer import data_parallel
from jaxinfer.config import ModelConfig
from jaxinfer.model import params_for_layer_loop
from jaxinfer.paged_attention import DecodeItems, PagedAttentionMeta, PagedKVCache, paged_attend
from jaxinfer.request import Request
from jaxinfer.sampling import apply_penalties, logprobs, sample, step_keys
from jaxinfer.sampling_params import MAX_LOGPROBS
from jaxinfer.scheduler import SchedulerOutput
from pallas_kernels import ops
from pallas_kernels.paged_attention_reference import decode_items

logger = logging.getLogger(__name__)


def default_page_buckets(max_pages_per_seq: int) -> tuple[int, ...]:
    """Page-table widths: the full width, then quarters of it down to 4 pages."""
    widths = [max_pages_per_seq]
    while widths[-1] // 4 >= 4:
        widths.append(widths[-1] // 4)
    return tuple(sorted(widths))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    """Attributes:
      page_size: tokens per KV page.
      num_pages: pages in the device cache (page 0 is the null page).
      max_pages_per_seq: page-table width (max_model_len / page_size, rounded up).
      token_buckets: padded token counts of mixed steps, ascending; the last must cover
        max_num_batched_tokens.
      seq_buckets: padded sequence counts, ascending; the last must cover max_num_seqs.
      page_buckets: page-table widths, ascending, the last max_pages_per_seq; None: quarters
        (`default_page_buckets`). Attention reads a step's pages up to this width.
      q_block: most query rows per attention block of a prefill chunk in mixed steps.
      max_prefill_seqs: most multi-token chunks per step (`SchedulerConfig.max_prefill_seqs`).
      pages_per_item: pages per work item of decode attention (bigger items make bigger matmuls
        but waste part of each sequence's last item).
      attention_backend: `pallas_kernels.ops` backend name.
      sequence_parallel_size: devices of the `seq` mesh axis (tokens and KV pages split over them).
    """

    page_size: int
    num_pages: int
    max_pages_per_seq: int
    token_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    seq_buckets: tuple[int, ...] = (1, 2, 4, 8, 16)
    page_buckets: tuple[int, ...] | None = None
    q_block: int = 32
    max_prefill_seqs: int = 4
    pages_per_item: int = 2
    attention_backend: str = "auto"
    sequence_parallel_size: int = 1

    @property
    def use_decode_items(self) -> bool:
        """Decode steps as (sequence, page-group) work items: the reference backend without
        sequence parallelism (else the ragged path, one query per block)."""
        return ops.uses_decode_items(self.attention_backend) and self.sequence_parallel_size == 1

    def __post_init__(self):
        if self.page_buckets is None:
            object.__setattr__(self, "page_buckets", default_page_buckets(self.max_pages_per_seq))
        for name in ("token_buckets", "seq_buckets", "page_buckets"):
            b = tuple(getattr(self, name))
            object.__setattr__(self, name, b)
            if not b or list(b) != sorted(set(b)) or b[0] <= 0:
                raise ValueError(f"{name} must be ascending positive integers, got {b}")
        if self.page_buckets[-1] < self.max_pages_per_seq:
            raise ValueError(f"the last page bucket {self.page_buckets[-1]} must cover max_pages_per_seq="
                             f"{self.max_pages_per_seq}")
        if self.num_pages < 2:
            raise ValueError(f"num_pages must be at least 2 (page 0 is the null page), got {self.num_pages}")
        ops.resolve_backend(self.attention_backend)

    def item_buckets(self, num_seqs: int) -> tuple[int, ...]:
        """Work-item counts of a decode step with `num_seqs` sequence slots: 1, 2, 4, ... items per
        sequence on average, up to every sequence at full length."""
        top = num_seqs * -(-self.max_pages_per_seq // self.pages_per_item)
        out, n = [], num_seqs
        while n < top:
            out.append(n)
            n *= 2
        return tuple(out + [top])

    def mixed_q_block(self, num_tokens: int) -> int:
        """Query rows per attention block of the prefill chunks in a mixed step of `num_tokens`
        (a power of two; each chunk may own one partial block, so blocks stay below T / P rows)."""
        rows = max(1, min(self.q_block, num_tokens // self.max_prefill_seqs))
        return 1 << (rows.bit_length() - 1)


class StepShape(NamedTuple):
    T: int  # tokens
    S: int  # sequence slots
    W: int  # page-table width (1 on decode steps with work items)
    q_block: int  # query rows per prefill block (mixed steps; 1 on decode steps)
    I: int  # (sequence, page) work items (reference decode steps; else 0)

    @property
    def is_decode(self) -> bool:
        return self.I > 0


def _bucket(buckets: Sequence[int], n: int, what: str) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} {what} exceed the largest bucket {buckets[-1]}; raise the bucket list")
    return buckets[i]


@flax.struct.dataclass
class ModelInput:
    tokens: jax.Array  # [1, T] int32
    positions: jax.Array  # [1, T] int32
    meta: PagedAttentionMeta
    logits_indices: jax.Array  # [S] int32: the last token of each chunk (the rows to sample from)


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
    """Owns the device KV cache and the jit steps.

    Args:
      config: the model's config.
      graphdef, params: the NNX model, split (`jaxinfer.loader.LoadedModel`).
      runner_config: cache geometry and shape buckets.
      eos_token_ids: tokens suppressed until a request's min_tokens are generated.
    """

    def __init__(self, config: ModelConfig, graphdef: nnx.GraphDef, params: nnx.State, runner_config: RunnerConfig,
                 *, eos_token_ids: Iterable[int] = (), mesh=None):
        self.config = config
        self.rc = runner_config
        self.graphdef = graphdef
        self.eos_token_ids = tuple(eos_token_ids)
        self.mesh = mesh
        self.num_replicas = 1 if mesh is None else mesh.shape["data"]
        self.step_hook = None  # called with each StepPlan before it runs (multi-host broadcast)
        self.params = params_for_layer_loop(config, params)
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
        self._forward = jax.jit(self._forward_fn, donate_argnums=(1,), static_argnames=("q_block",))
        self._sample = jax.jit(self._sample_fn)
        self._prompt_logprobs = jax.jit(self._prompt_logprobs_fn)

    # ---- the jit functions ----------------------------------------------------------------------

    def _forward_fn(self, params, kv_cache, inp: ModelInput, *, q_block: int):
        model = nnx.merge(self.graphdef, params)
        if self.mesh is not None and self.mesh.shape["seq"] > 1:
            from sharding.attention import seq_parallel_attend

            attend = seq_parallel_attend(self.mesh)
        else:
            attend = functools.partial(paged_attend, q_block=q_block, max_prefill_seqs=self.rc.max_prefill_seqs,
                                       backend=self.rc.attention_backend)
            if self.mesh is not None:
                from sharding.attention import shard_attend

                attend = shard_attend(attend, self.mesh)
        hidden, kv_cache = model.forward(inp.tokens, inp.positions, kv_cache, inp.meta, attend)
        return hidden[0], hidden[0, inp.logits_indices], kv_cache

    def _sample_fn(self, params, rows, si: SamplingInput):
        """rows: [S, D] hidden states of the chunks' last tokens."""
        model = nnx.merge(self.graphdef, params)
        raw = model.compute_logits(rows)  # [S, V]
        logits = raw
        p = si.penalties
        if p is not None:
            logits = apply_penalties(raw, p.seen, p.output_counts, p.repetition, p.presence, p.frequency,
                                     p.suppress)
        keys = step_keys(si.seeds, si.num_generated)
        tokens = sample(logits, si.temperature, si.top_k, si.top_p, keys, si.min_p)
        if not si.num_logprobs:
            return tokens, None
        return tokens, logprobs(raw, tokens, si.num_logprobs)

    def _prompt_logprobs_fn(self, params, hidden, rows, targets):
        model = nnx.merge(self.graphdef, params)
        return logprobs(model.compute_logits(hidden[rows]), targets, MAX_LOGPROBS)

    # ---- shapes -------------------------------------------------------------------------------

    def step_shape(self, out: SchedulerOutput) -> StepShape:
        """The padded shape of the step that runs `out` (with data parallelism one shape that fits
        every replica's chunks: decode-shaped only if every replica only decodes)."""
        rc = self.rc
        outs = getattr(out, "replicas", (out,))
        tokens = [sum(len(c.token_ids) for c in o.chunks) for o in outs]
        seqs = [len(o.chunks) for o in outs]
        width = _bucket(rc.page_buckets, max(len(c.block_ids) for o in outs for c in o.chunks), "pages per sequence")
        if tokens == seqs:  # all decodes
            S = _bucket(rc.seq_buckets, max(seqs), "sequences")
            if not rc.use_decode_items:  # the kernels (and sequence parallelism): one query row per block
                return StepShape(S, S, width, 1, 0)
            per_item = rc.page_size * rc.pages_per_item
            items = max(sum(-(-(c.start_pos + 1) // per_item) for c in o.chunks) for o in outs)
            return StepShape(S, S, 1, 1, _bucket(rc.item_buckets(S), items, "decode work items"))
        _bucket(rc.seq_buckets, max(seqs), "sequences")
        T = _bucket(rc.token_buckets, max(tokens), "tokens")
        return StepShape(T, rc.seq_buckets[-1], width, rc.mixed_q_block(T), 0)

    def all_step_shapes(self) -> list[StepShape]:
        rc = self.rc
        if rc.use_decode_items:
            shapes = [StepShape(S, S, 1, 1, I) for S in rc.seq_buckets for I in rc.item_buckets(S)]
        else:
            shapes = [StepShape(S, S, W, 1, 0) for S in rc.seq_buckets for W in rc.page_buckets]
        shapes += [StepShape(T, rc.seq_buckets[-1], W, rc.mixed_q_block(T), 0) for T in rc.token_buckets
                   for W in rc.page_buckets]
        return shapes

    # ---- building inputs ----------------------------------------------------------------------

    def build_model_input(self, out: SchedulerOutput, shape: StepShape) -> ModelInput:
        """Packs the scheduled chunks into one padded ragged row (numpy; moved by jit)."""
        T, S, W = shape.T, shape.S, shape.W
        page = self.rc.page_size
        tokens = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        slots = np.zeros(T, np.int32)  # padding writes into the null page
        # Every page of every chunk; mixed steps see the first W columns (W covers them all), decode
        # steps turn it into work items instead.
        table = np.zeros((S, max(W, max((len(c.block_ids) for c in out.chunks), default=0))), np.int32)
        kv_lens = np.zeros(S, np.int32)
        cu = np.zeros(S + 1, np.int32)
        t = 0
        for s, chunk in enumerate(out.chunks):
            n, start = len(chunk.token_ids), chunk.start_pos
            pos = np.arange(start, start + n)
            blocks = np.asarray(chunk.block_ids, np.int32)
            tokens[t:t + n] = chunk.token_ids
            positions[t:t + n] = pos
            slots[t:t + n] = blocks[pos // page] * page + pos % page
            table[s, :len(blocks)] = blocks
            kv_lens[s] = start + n
            t += n
            cu[s + 1] = t
        cu[len(out.chunks) + 1:] = t
        items = None
        if shape.is_decode:
            items = DecodeItems(*decode_items(kv_lens, table, page, shape.I, self.rc.pages_per_item))
        meta = PagedAttentionMeta(slot_mapping=slots, kv_lens=kv_lens, page_table=table[:, :W], cu_q_lens=cu,
                                  num_seqs=np.int32(len(out.chunks)), decode_items=items)
        logits_indices = np.maximum(cu[1:] - 1, 0).astype(np.int32)
        return ModelInput(tokens=tokens[None], positions=positions[None], meta=meta, logits_indices=logits_indices)

    def build_sampling_input(self, out: SchedulerOutput, requests: Mapping[str, Request], S: int) -> SamplingInput:
        V = self.config.vocab_size
        temperature, top_p, min_p = np.zeros(S, np.float32), np.ones(S, np.float32), np.zeros(S, np.float32)
        top_k, seeds, num_generated = np.zeros(S, np.int32), np.zeros(S, np.uint32), np.zeros(S, np.int32)
        needs_history = []
        want_logprobs = False
        for s, chunk in enumerate(out.chunks):
            if not chunk.samples:
                continue
            request = requests[chunk.request_id]
            p = request.sampling_params
            temperature[s], top_p[s], min_p[s] = p.temperature, p.top_p, p.min_p
            top_k[s] = p.top_k if 0 < p.top_k < V else 0  # k >= vocab keeps every token: disabled
            seeds[s] = request.seed % (1 << 32)
            num_generated[s] = len(request.output_token_ids)
            want_logprobs |= p.logprobs is not None
            if p.needs_penalties or len(request.output_token_ids) < p.min_tokens:
                needs_history.append((s, request))
        penalties = None
        if needs_history:
            seen = np.zeros((S, V), bool)
            counts = np.zeros((S, V), np.float32)
            suppress = np.zeros((S, V), bool)
            rep, pres, freq = np.ones(S, np.float32), np.zeros(S, np.float32), np.zeros(S, np.float32)
            for s, request in needs_history:
                p = request.sampling_params
                rep[s], pres[s], freq[s] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
                seen[s, request.all_token_ids] = True
                counts[s] = np.bincount(request.output_token_ids, minlength=V)[:V]
                if len(request.output_token_ids) < p.min_tokens:
                    stoppers = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
                    suppress[s, [i for i in stoppers if i < V]] = True
            penalties = Penalties(seen=seen, output_counts=counts, repetition=rep, presence=pres, frequency=freq,
                                  suppress=suppress)
        return SamplingInput(temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, seeds=seeds, num_generated=num_generated, penalties=penalties,
                             num_logprobs=MAX_LOGPROBS if want_logprobs else 0)

    def _prompt_logprob_rows(self, out: SchedulerOutput, requests: Mapping[str, Request]):
        """(request id, position) pairs and their hidden-state rows for prompt logprobs."""
        rows, targets, owners = [], [], []
        t = 0
        for chunk in out.chunks:
            request = requests[chunk.request_id]
            if request.sampling_params.prompt_logprobs is not None:
                for i in range(len(chunk.token_ids)):
                    pos = chunk.start_pos + i  # row i predicts the token at pos + 1
                    if pos + 1 < request.num_prompt_tokens:
                        rows.append(t + i)
                        targets.append(request.prompt_token_ids[pos + 1])
                        owners.append((chunk.request_id, pos + 1))
            t += len(chunk.token_ids)
        return rows, targets, owners

    # ---- running ------------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput, requests: Mapping[str, Request]) -> StepResult:
        """Runs one step: the sampled token of every chunk that samples (and logprobs). `out` may
        be a `data_parallel.DataParallelOutput`: every replica's chunks run in one step."""
        if out.is_empty:
            return StepResult({}, {})
        outs = getattr(out, "replicas", (out,))
        shape = self.step_shape(out)
        inputs, sampling, rows, targets, owners, chunk_rows = [], [], [], [], [], []
        for r, o in enumerate(outs):  # replica r owns rows r*T.. of the tokens and r*S.. of the sequences
            inputs.append(self.build_model_input(o, shape))
            sampling.append(self.build_sampling_input(o, requests, shape.S))
            rr, tt, oo = self._prompt_logprob_rows(o, requests)
            rows += [x + r * shape.T for x in rr]
            targets += tt
            owners += oo
            chunk_rows += [(chunk, r * shape.S + s) for s, chunk in enumerate(o.chunks)]
        if len(outs) == 1:
            model_input, sampling_input = inputs[0], sampling[0]
        else:
            model_input = data_parallel.stack_model_inputs(inputs, shape.T)
            sampling_input = data_parallel.stack_sampling_inputs(sampling, self.config.vocab_size)
        plan = StepPlan(shape=shape, model_input=model_input, sampling_input=sampling_input,
                        prompt_rows=np.asarray(rows, np.int32), prompt_targets=np.asarray(targets, np.int32))
        if self.step_hook is not None:  # multi-host: the other processes run the same plan
            self.step_hook(plan)
        tokens, lps, prompt_lps, device_seconds = self.run_plan(plan)
        sampled = {}
        for chunk, s in chunk_rows:
            if not chunk.samples:
                continue
            result = SampledToken(int(tokens[s]))
            n = requests[chunk.request_id].sampling_params.logprobs
            if n is not None:
                result.logprob = float(lps[0][s])
                result.top_logprobs = [(int(i), float(v)) for i, v in zip(lps[1][s, :n], lps[2][s, :n])]
            sampled[chunk.request_id] = result
        prompt = {}
        for r, ((rid, pos), target) in enumerate(zip(owners, targets)):
            n = requests[rid].sampling_params.prompt_logprobs
            prompt.setdefault(rid, []).append(PromptLogprob(
                pos, target, float(prompt_lps[0][r]),
                [(int(i), float(v)) for i, v in zip(prompt_lps[1][r, :n], prompt_lps[2][r, :n])]))
        return StepResult(sampled, prompt, device_seconds)

    def run_plan(self, plan: "StepPlan"):
        """The device part of a step (every process of a multi-host run executes it on the same
        plan): forward, sample, prompt logprobs -> (tokens, logprobs, prompt logprobs, seconds
        spent waiting for the device), as numpy arrays."""
        shape = plan.shape
        hidden, rows, self.kv_cache = self._forward(self.params, self.kv_cache, plan.model_input,
                                                    q_block=shape.q_block)
        tokens, lps = self._sample(self.params, rows, plan.sampling_input)
        prompt_lps = None
        if len(plan.prompt_rows):
            pad = (0, plan.model_input.tokens.shape[1] - len(plan.prompt_rows))  # one graph per hidden shape
            prompt_lps = self._prompt_logprobs(self.params, hidden, np.pad(plan.prompt_rows, pad),
                                               np.pad(plan.prompt_targets, pad))
        start = time.perf_counter()
        tokens = np.asarray(tokens)
        if lps is not None:
            lps = [np.asarray(a) for a in lps]
        if prompt_lps is not None:
            prompt_lps = [np.asarray(a) for a in prompt_lps]
        return tokens, lps, prompt_lps, time.perf_counter() - start

    def warmup(self, progress: bool = False) -> int:
        """Compiles every step shape and sampler variant; returns how many graphs were run."""
        rc = self.rc
        shapes = self.all_step_shapes()
        it = shapes
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(shapes, desc="Compiling steps", unit="shape")
        count = 0
        D = self.num_replicas  # data-parallel steps stack D replicas' inputs
        hidden, sample_rows = {}, {}
        for shape in it:
            T, S, W = shape.T, shape.S, shape.W
            items = None
            if shape.is_decode:
                items = DecodeItems(*decode_items(np.zeros(S, np.int32), np.zeros((S, 1), np.int32),
                                                  rc.page_size, shape.I, rc.pages_per_item))
            inp = ModelInput(tokens=np.zeros((1, T), np.int32), positions=np.zeros((1, T), np.int32),
                             meta=PagedAttentionMeta(slot_mapping=np.zeros(T, np.int32), kv_lens=np.zeros(S, np.int32),
                                                     page_table=np.zeros((S, W), np.int32),
                                                     cu_q_lens=np.zeros(S + 1, np.int32), num_seqs=np.int32(0),
                                                     decode_items=items),
                             logits_indices=np.zeros(S, np.int32))
            if D > 1:
                inp = data_parallel.stack_model_inputs([inp] * D, T)
            hidden[T], rows, self.kv_cache = self._forward(self.params, self.kv_cache, inp, q_block=shape.q_block)
            sample_rows[S] = rows
            count += 1
        V = self.config.vocab_size
        for S in rc.seq_buckets:
            h = sample_rows[S]
            for with_penalties in (False, True):
                for num_logprobs in (0, MAX_LOGPROBS):
                    pen = None
                    if with_penalties:
                        pen = Penalties(seen=np.zeros((S, V), bool), output_counts=np.zeros((S, V), np.float32),
                                        repetition=np.ones(S, np.float32), presence=np.zeros(S, np.float32),
                                        frequency=np.zeros(S, np.float32), suppress=np.zeros((S, V), bool))
                    si = SamplingInput(temperature=np.ones(S, np.float32),
                                       top_k=np.zeros(S, np.int32), top_p=np.ones(S, np.float32),
                                       min_p=np.zeros(S, np.float32), seeds=np.zeros(S, np.uint32),
                                       num_generated=np.zeros(S, np.int32), penalties=pen,
                                       num_logprobs=num_logprobs)
                    if D > 1:
                        si = data_parallel.stack_sampling_inputs([si] * D, V)
                    jax.block_until_ready(self._sample(self.params, h, si))
                    count += 1
        for T, h in hidden.items():
            rows = np.zeros(T * D, np.int32)
            jax.block_until_ready(self._prompt_logprobs(self.params, h, rows, rows))
            count += 1
        jax.block_until_ready(self.kv_cache)
        return count
