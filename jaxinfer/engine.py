"""LLMEngine: requests in, RequestOutputs out, one scheduler step at a time.

    add_request(id, prompt, params)       (validated at the edge: InputProcessor) -> n sample
                                          Requests (parent_id, sample_index)
                                          -> Scheduler.waiting; OutputProcessor.add_request
    step()                                schedule -> execute -> update -> process:
        Scheduler.schedule                SchedulerOutput (the only thing the runner sees)
        Runner.execute                    device step -> StepResult (sampled tokens, logprobs)
        Scheduler.update                  SchedulerUpdate (new token ids, finished + why)
        OutputProcessor.process           detokenize, stop strings, deltas -> RequestOutputs

With async scheduling (`EngineConfig.async_scheduling`) `Runner.execute` dispatches step N + 1 and
then returns step N's results, so the host's update/process of step N and its scheduling/input building of step
N + 2 run while the device computes step N + 1:

    host:    schedule N+1 | submit N+1 | collect N (wait) | update N, process N | schedule N+2 ...
    device:  ....... step N ..........| step N+1 ...................................| step N+2

A decode in step N + 1 reads the token step N samples for it on the device. A request that step
N ends (EOS, stop token, stop string, abort) wastes its slot of step N + 1, whose token is dropped;
max_tokens and the context end are known in advance and waste nothing.
    abort(id)                             frees everything the request holds

A request with n > 1 samples becomes n sample requests with seeds seed, seed + 1, ... The first
sample runs alone until its prompt is computed; the others are admitted then and find the prompt's
full pages in the prefix cache, so the prompt is computed once and its pages are shared.
A beam search of width W becomes W beam requests sharing one `beam_search.BeamSearch`; the
scheduler forks them (see scheduler.py) and `update` reports the search when it ends.

The engine is single-threaded; `jaxinfer.async_engine.AsyncEngine` runs it on a background thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import random
import time
from typing import Sequence

import jax

from jaxinfer.beam_search import BeamSearch
from jaxinfer.cache import KVCacheManager
from jaxinfer.config import ModelConfig
from jaxinfer.data_parallel import DataParallelScheduler
from jaxinfer.engine_config import (  # noqa: F401 (EngineConfig and set_compilation_cache re-exported)
    DEFAULT_PAGE_SIZE,
    SP_NEEDS_REFERENCE,
    EngineConfig,
    default_layer_loop,
    kv_page_bytes,
    kv_pool_pages,
    runner_config,
    set_compilation_cache,
)
from jaxinfer.errors import InvalidRequestError
from jaxinfer.input_processor import InputProcessor, ProcessedPrompt
from jaxinfer.output_processor import OutputProcessor
from jaxinfer.outputs import RequestOutput
from jaxinfer.request import Request, RequestStatus
from jaxinfer.runner import Runner
from jaxinfer.sampling_params import MAX_LOGPROBS, SamplingParams
from jaxinfer.scheduler import Scheduler, SchedulerConfig
from jaxinfer.speculative import load_proposer
from jaxinfer.structured_output import GrammarCompiler
from jaxinfer.tokenizer import Tokenizer
from pallas_kernels import ops
from sharding.mesh import make_mesh

logger = logging.getLogger(__name__)


class LLMEngine:
    """Continuous-batching engine over a paged KV cache.

    Args:
      config: the model's config.
      graphdef, params: the NNX model, split.
      tokenizer: the model's tokenizer (detokenization, EOS ids).
      engine_config: limits and cache geometry.
      warmup: compile every step shape now (else on first use).
    """

    def __init__(self, config: ModelConfig, graphdef, params, tokenizer: Tokenizer,
                 engine_config: EngineConfig | None = None, *, warmup: bool = False, devices=None):
        # Built here, not as a default argument: EngineConfig() asks JAX for its backend, and importing
        # this module must not start the backend before a multi-host run's jax.distributed.initialize.
        ec = engine_config if engine_config is not None else EngineConfig()
        cache, sched, comp, pc = ec.cache, ec.scheduling, ec.compile, ec.parallel
        if pc.sequence_parallel_size > 1 and ops.resolve_backend(comp.attention_backend) != "reference":
            raise InvalidRequestError(SP_NEEDS_REFERENCE)
        self.mesh = None
        if not pc.is_single_device or devices is not None:
            # Raises if the sizes do not multiply to the device count; heads re-laid out so every
            # `model` shard owns whole GQA groups (sharding/heads.py).
            try:
                self.mesh = make_mesh(pc, devices)
            except ValueError as e:
                raise InvalidRequestError(str(e)) from None
            if pc.tensor_parallel_size > 1:
                from sharding.heads import relayout_model

                config, graphdef, params = relayout_model(config, params, pc.tensor_parallel_size)
        self.config = config
        self.engine_config = ec
        self.tokenizer = tokenizer
        self.max_model_len = min(sched.max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        device = jax.local_devices()[0]  # in a multi-process run jax.devices()[0] may live on another host
        if (kv8_error := ops.kv_cache_dtype_error(cache.kv_cache_dtype, comp.attention_backend, device)) is not None:
            raise InvalidRequestError(kv8_error)
        page_size = cache.page_size or DEFAULT_PAGE_SIZE.get(device.platform, 16)
        spec = sched.speculative_config
        if spec is not None:  # "auto" settings: this platform's measured ones
            spec = spec.resolve(device.platform, tree_rows=ops.uses_decode_items(comp.attention_backend))
        # method "draft": the draft model, "eagle": the draft head, loaded and checked against this model
        draft_model, draft_head = load_proposer(spec, config, params, tokenizer, self.max_model_len, self.mesh)

        # A page holds a page of the target's cache and (speculative method "draft") one of the draft's.
        page_bytes = kv_page_bytes(ec, config, page_size)
        if draft_model is not None:
            page_bytes += kv_page_bytes(ec, draft_model.config, page_size)
        num_pages, self.max_model_len = kv_pool_pages(ec, device, page_bytes, page_size, self.max_model_len)
        logger.info("KV cache: %d pages x %d tokens = %d tokens, %.1f MiB on %s", num_pages - 1, page_size,
                    (num_pages - 1) * page_size, num_pages * page_bytes / 2**20, device.platform)
        self.num_pages, self.page_size, self.page_bytes = num_pages, page_size, page_bytes

        max_tokens, sp = sched.max_num_batched_tokens, pc.sequence_parallel_size
        rc = runner_config(ec, page_size=page_size, num_pages=num_pages, max_model_len=self.max_model_len,
                           speculative=spec)
        # One page pool per data-parallel replica (num_pages each, local ids), one scheduler over them.
        # With sequence parallelism one pool of num_pages per `seq` device, striped (BlockPool).
        self.kv_managers = [KVCacheManager(num_blocks=num_pages * sp, page_size=page_size,
                                           enable_prefix_caching=cache.enable_prefix_caching, num_stripes=sp)
                            for _ in range(pc.data_parallel_size)]
        self.kv_manager = self.kv_managers[0]
        sched_config = SchedulerConfig(max_num_seqs=sched.max_num_seqs, max_num_batched_tokens=max_tokens,
                                       max_model_len=self.max_model_len, policy=sched.policy,
                                       max_prefill_seqs=sched.max_prefill_seqs, speculative=spec)
        if pc.data_parallel_size == 1:
            self.scheduler = Scheduler(sched_config, self.kv_manager, eos_token_ids=tokenizer.eos_token_ids)
        else:
            self.scheduler = DataParallelScheduler(sched_config, self.kv_managers,
                                                   eos_token_ids=tokenizer.eos_token_ids)
        layer_loop = comp.layer_loop or default_layer_loop(device.platform, self.mesh, config, sched.max_num_seqs)
        one_device = self.mesh is None and jax.process_count() == 1
        if sched.async_scheduling and not one_device:
            raise InvalidRequestError("async_scheduling=True runs on one device in one process; with tensor, data or "
                                      "sequence parallelism or several hosts leave it unset (steps run synchronously)")
        # Default: on where the device is not the host's own cores (decision 50: on this 2-core CPU
        # the overlap costs the step a core and measured 9% slower).
        default_async = one_device and device.platform != "cpu" and spec is None
        self.async_scheduling = default_async if sched.async_scheduling is None else sched.async_scheduling
        self.grammars = GrammarCompiler(tokenizer, config.vocab_size)  # structured outputs, thinking budgets
        self.runner = Runner(config, graphdef, params, rc, eos_token_ids=tokenizer.eos_token_ids, mesh=self.mesh,
                             layer_loop=layer_loop, async_scheduling=self.async_scheduling, speculative=spec,
                             draft_head=draft_head, draft_model=draft_model, grammars=self.grammars)
        self.output_processor = OutputProcessor(tokenizer)
        self.input_processor = InputProcessor(config.vocab_size, self.max_model_len, config.max_position_embeddings,
                                              self.grammars, max_num_seqs=sched.max_num_seqs,
                                              eos_token_ids=tokenizer.eos_token_ids)
        self._samples: dict[str, list[str]] = {}  # request id -> its samples' scheduler ids
        self._holding: dict[str, list[Request]] = {}  # n > 1: samples waiting for sample 0's prompt
        self._stopped: list[str] = []  # samples a stop string ended: aborted in the core at the next step
        self._rng = random.Random(sched.seed)
        self._ids = itertools.count()
        self.counters = dict(steps=0, prompt_tokens=0, generation_tokens=0, computed_tokens=0, finished=0,
                             aborted=0, host_seconds=0.0, device_seconds=0.0, warmup_graphs=0)
        self._kv_pages_peak = 0  # the most pages held after a step, since start or `reset_kv_pages_peak`
        if warmup:
            self.warmup()

    # ---- requests -----------------------------------------------------------------------------

    def warmup(self, progress: bool = False, threads: int = 1, cancel=None) -> None:
        """Compiles every step shape, so no request waits for a compile (`threads` at once; a set
        `cancel` event skips the graphs not started yet)."""
        start = time.perf_counter()
        self.counters["warmup_graphs"] = self.runner.warmup(progress=progress, threads=threads, cancel=cancel)
        logger.info("warm-up: %d graphs in %.1f s", self.counters["warmup_graphs"], time.perf_counter() - start)

    def add_request(self, request_id: str | None, prompt: ProcessedPrompt | Sequence[int],
                    params: SamplingParams | None = None, *, prompt_text: str | None = None, priority: int = 0,
                    arrival_time: float | None = None) -> str:
        """Queues a request; returns its id. A `ProcessedPrompt` (the entry points validate once,
        `input_processor`) is trusted; raw token ids and params are validated here. Raises a typed
        error (and queues nothing) on bad input."""
        prompt = self.input_processor.checked(prompt, params)  # (as is if this engine's processor made it)
        ids, params = list(prompt.token_ids), prompt.params
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        k = params.num_samples  # (best_of > n: all drawn, the n best returned)
        sample_ids = [request_id] if k == 1 else [f"{request_id}#{i}" for i in range(k)]
        in_flight = self.runner.in_flight.chunks if self.runner.in_flight is not None else ()
        if request_id in self._samples or any(sid in self.scheduler.requests for sid in sample_ids) or any(
                c.request_id in sample_ids for c in in_flight):  # (a step in flight still reports on it)
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seed = params.seed if params.seed is not None else self._rng.getrandbits(32)
        core_params = params  # best_of ranks samples by their tokens' log-probabilities: the sampler returns them
        if k > params.n and params.logprobs is None:
            core_params = dataclasses.replace(params, logprobs=0)
        search = None
        if params.use_beam_search:  # every beam's top candidates come back as its logprobs
            search = self._beam_search(request_id, sample_ids, ids, params)
            core_params = dataclasses.replace(params, logprobs=MAX_LOGPROBS)
        samples = [Request(sid, ids, core_params, priority=priority, arrival_time=arrival, seed=seed + i,
                           parent_id=request_id, sample_index=i) for i, sid in enumerate(sample_ids)]
        self.output_processor.add_request(request_id, prompt_text, ids, params, sample_ids, arrival)
        self._samples[request_id] = sample_ids
        if search is not None:  # the first beam computes the prompt, the search forks the others
            for sample in samples:
                sample.beam = search
                self.scheduler.add_request(sample)
        else:
            self.scheduler.add_request(samples[0])
            if samples[1:]:
                self._holding[request_id] = samples[1:]
        self.counters["prompt_tokens"] += len(ids)
        return request_id

    def _beam_search(self, request_id: str, beam_ids: list[str], prompt: list[int], params: SamplingParams):
        """A request's BeamSearch (its width was checked by the input processor)."""
        if jax.process_count() > 1:
            raise InvalidRequestError("beam search runs in one process: use sampling (n, best_of) on a multi-host "
                                      "engine")
        return BeamSearch(request_id, beam_ids, length_penalty=params.length_penalty,
                          early_stopping=params.early_stopping,
                          max_new_tokens=min(params.max_tokens, self.max_model_len - len(prompt)),
                          stop_token_ids=params.ending_token_ids(self.tokenizer.eos_token_ids),
                          user_stop_token_ids=params.stop_token_ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request (all its samples) and frees its pages.

        Returns its final output (unfinished samples with finish_reason "abort"), or None if the
        id is unknown or already finished.
        """
        sample_ids = self._samples.pop(request_id, None)
        if sample_ids is None:
            return None
        self._holding.pop(request_id, None)
        for sid in sample_ids:
            self.scheduler.abort(sid)
        self.counters["aborted"] += 1
        return self.output_processor.abort(request_id)

    def memory(self) -> dict[str, int]:
        """What the model takes: parameter bytes (quantized values, scales and offsets counted as
        stored), the KV pool's bytes and pages, and KV tokens per GiB of cache budget."""
        from jaxinfer.loader import params_bytes

        return {"params_bytes": params_bytes(self.runner.params), "kv_cache_bytes": self.num_pages * self.page_bytes,
                "kv_pages": self.num_pages, "kv_page_bytes": self.page_bytes,
                "kv_tokens_per_gib": (2**30 // self.page_bytes) * self.page_size}

    def has_unfinished_requests(self) -> bool:
        return bool(self._samples or self._stopped or self.runner.in_flight is not None)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._samples)

    # ---- one step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one scheduler step; returns an output for every request that made progress."""
        start = time.perf_counter()
        self._admit_and_stop()
        out = self.scheduler.schedule()
        with self._failure_aborts(out):  # a step that raises fails the requests it carried, nothing else
            result = self.runner.execute(out)  # async: dispatches `out`, returns the step before it (or None)
        if result is None:
            return []  # (the first step of a run is in flight: nothing to report yet)
        update = self.scheduler.update(result.out, result.token_ids, result.draft_token_ids, result.candidates)
        processed = self.output_processor.process(update, result)
        self._account(result.out, result, processed, start)
        return processed.outputs

    @contextlib.contextmanager
    def _failure_aborts(self, out):
        """If the step raises, aborts every request of `out` and of the step still in flight (their
        computed and pending tokens were counted when scheduled and will never come back; the
        runner may not even have seen `out`), then re-raises. Other requests go on unharmed."""
        in_flight = self.runner.in_flight
        try:
            yield
        except Exception:
            sids = set()
            for o in (out, in_flight):
                if o is not None:
                    sids |= {c.request_id for c in o.chunks} | set(o.preempted_ids)
                    sids |= {n.request_id for n in o.new_requests}
            parents = {self.scheduler.requests[s].parent_id for s in sids if s in self.scheduler.requests}
            for rid in sorted(parents):
                self.abort(rid)
            logger.error("an engine step failed; aborted the %d requests it carried", len(parents))
            raise

    def _admit_and_stop(self) -> None:
        """Before scheduling: ends the samples stop strings finished in the last step (the core
        never saw those strings), and admits the other samples of n > 1 requests once sample 0's
        prompt is computed (they then find the prompt's pages in the prefix cache)."""
        for sid in self._stopped:
            self.scheduler.finish_request(sid, RequestStatus.FINISHED_STOPPED)
        self._stopped = []
        for rid, held in list(self._holding.items()):
            first = self.scheduler.requests.get(self._samples[rid][0])
            if first is None or first.num_computed_tokens >= first.num_prompt_tokens - 1:
                for request in held:
                    self.scheduler.add_request(request)
                del self._holding[rid]

    def _account(self, out, result, processed, start: float) -> None:
        """Counters, the samples to stop at the next step, and the requests that ended."""
        if out.is_empty and self.scheduler.has_unfinished_requests() and self.runner.in_flight is None:
            raise RuntimeError("the scheduler could not place any request; the KV cache is too small for the "
                               "smallest waiting request")
        self._stopped += processed.abort_ids
        for output in processed.outputs:
            if output.finished:
                self._samples.pop(output.request_id, None)
                self._holding.pop(output.request_id, None)
        self._kv_pages_peak = max(self._kv_pages_peak, self._kv_pages_used())
        c = self.counters
        c["generation_tokens"] += processed.num_new_tokens
        c["finished"] += processed.num_finished
        if not out.is_empty:
            c["steps"] += 1
            c["computed_tokens"] += out.num_scheduled_tokens
            c["device_seconds"] += result.device_seconds
            c["host_seconds"] += time.perf_counter() - start - result.device_seconds

    # ---- stats --------------------------------------------------------------------------------

    def _kv_pages_used(self) -> int:
        return sum(kv.pool.num_blocks - 1 - kv.num_free_blocks for kv in self.kv_managers)

    def reset_kv_pages_peak(self) -> None:
        """Starts `stats()["kv_pages_peak"]` again from the pages held now (a benchmark's window)."""
        self._kv_pages_peak = self._kv_pages_used()

    def stats(self) -> dict[str, float]:
        """Running/waiting counts, KV pages (total, used, the peak used after a step, cached),
        prefix-cache hit rate, preemptions and totals."""
        s = self.scheduler.stats()
        kvs = self.kv_managers
        total = sum(kv.pool.num_blocks - 1 for kv in kvs)
        s.update(kv_pages_total=total, kv_pages_used=self._kv_pages_used(), kv_pages_peak=self._kv_pages_peak,
                 kv_pages_cached=sum(kv.pool.num_cached_blocks for kv in kvs),
                 prefix_cache_hit_tokens=sum(kv.prefix_cache_hits for kv in kvs),
                 prefix_cache_query_tokens=sum(kv.prefix_cache_queries for kv in kvs),
                 num_unfinished=len(self._samples), **self.counters)
        return s
