"""Engine settings, one frozen config per concern (`CacheConfig`, `SchedulingConfig`,
`BucketConfig`, `sharding.mesh.ParallelConfig`, `CompileConfig`) composed into `EngineConfig`;
the KV-cache byte budget, the pool and the runner's config derived from them (the process-wide
compilation cache the entry points set: `compilation_cache`, re-exported here).
Building a config never starts a JAX backend (a multi-host run calls jax.distributed.initialize
first); what needs the device is resolved by `LLMEngine`.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from jaxinfer.compilation_cache import set_compilation_cache  # noqa: F401 (re-exported)
from jaxinfer.errors import InvalidRequestError
from jaxinfer.speculative import SpeculativeConfig
from pallas_kernels import ops
from pallas_kernels.kv_quant import KV_CACHE_DTYPES
from sharding.mesh import ParallelConfig

DEFAULT_PAGE_SIZE = {"cpu": 16, "gpu": 16, "tpu": 64}
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # XLA:CPU reports no memory limit: 1 GiB unless told
DEFAULT_MEMORY_FRACTION = 0.9  # of the accelerator memory left free after the weights
SP_NEEDS_REFERENCE = ("sequence_parallel_size > 1 needs attention_backend='reference': the Pallas kernels do not "
                       "return the log-sum-exp that combines the sequence shards yet")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise InvalidRequestError(msg)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """The KV cache.

    Attributes:
      page_size: tokens per KV page (None: 16 on CPU/GPU, 64 on TPU).
      kv_cache_memory: bytes for the KV cache (None: `memory_fraction` of the free accelerator
        memory; 1 GiB on CPU).
      memory_fraction: share of the free accelerator memory given to the KV cache.
      num_pages: an exact page count (overrides the memory budget; for tests).
      enable_prefix_caching: reuse computed prompt pages across requests.
      kv_cache_dtype: "auto" (the model's dtype), "int8" or "fp8" (float8 e4m3): 8-bit keys and
        values with a float32 scale per token and KV head (`pallas_kernels.kv_quant`): 2H / (H + 4)
        times the tokens of bfloat16 in the same budget (1.88x at head dim 64).
    """

    page_size: int | None = None
    kv_cache_memory: int | None = None
    memory_fraction: float = DEFAULT_MEMORY_FRACTION
    num_pages: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        _check(self.kv_cache_dtype in KV_CACHE_DTYPES,
               f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        _check(self.page_size is None or self.page_size > 0, f"page_size must be positive, got {self.page_size}")
        _check(self.kv_cache_memory is None or self.kv_cache_memory > 0,
               f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        _check(0 < self.memory_fraction <= 1, f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulingConfig:
    """What runs in a step.

    Attributes:
      max_model_len: context limit in tokens (None: the model's own, lowered with a warning to what
        the KV-cache budget holds when that is less).
      max_num_seqs: most requests running at once.
      max_num_batched_tokens: most tokens computed per step (prefill chunks are cut to fit).
      max_prefill_seqs: most requests given a multi-token (prefill) chunk per step.
      policy: "fcfs" or "priority".
      async_scheduling: schedule and build step N + 1 while the device runs step N (host time
        hidden behind the device's); None: on for one GPU / TPU in one process, off on CPU (where
        host and "device" share the cores: measured slower, decision 50) and with tensor / data /
        sequence parallelism or several hosts (synchronous steps); True / False: as asked.
      seed: seeds requests that set none.
      speculative_config: speculative decoding (`jaxinfer.speculative.SpeculativeConfig`, or a dict
        of its fields); None: off. Steps then run synchronously on one replica.
    """

    max_model_len: int | None = None
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_prefill_seqs: int = 4
    policy: str = "fcfs"
    async_scheduling: bool | None = None
    seed: int = 0
    speculative_config: SpeculativeConfig | None = None

    def __post_init__(self):
        object.__setattr__(self, "speculative_config", SpeculativeConfig.of(self.speculative_config))
        _check(self.max_num_seqs > 0, f"max_num_seqs must be positive, got {self.max_num_seqs}")
        _check(self.max_num_batched_tokens >= self.max_num_seqs,
               f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
               f"({self.max_num_seqs}): every running request needs a token per step")
        _check(self.max_model_len is None or self.max_model_len > 1,
               f"max_model_len must be at least 2 tokens, got {self.max_model_len}")
        _check(self.max_prefill_seqs > 0, f"max_prefill_seqs must be positive, got {self.max_prefill_seqs}")
        _check(self.policy in ("fcfs", "priority"), f"policy must be 'fcfs' or 'priority', got {self.policy!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BucketConfig:
    """The step shapes compiled (`runner.buckets`).

    Attributes:
      token_buckets, seq_buckets, page_buckets: step shapes (None: powers of two up to the limits).
      q_block: query rows per attention block of a prefill chunk.
      pages_per_item: KV pages per work item of decode attention.
    """

    token_buckets: tuple[int, ...] | None = None
    seq_buckets: tuple[int, ...] | None = None
    page_buckets: tuple[int, ...] | None = None
    q_block: int = 32
    pages_per_item: int = 2

    def __post_init__(self):
        _check(min(self.q_block, self.pages_per_item) > 0,
               f"q_block and pages_per_item must be positive, got {self.q_block}, {self.pages_per_item}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompileConfig:
    """How steps are compiled.

    Attributes:
      attention_backend: `pallas_kernels.ops` backend.
      layer_loop: "per_layer" (one compiled layer run once per layer from the host: fast compiles
        on CPU), "model" (one graph per step over the model's own loop, scanned or unrolled),
        "hybrid" (per_layer for steps with prefill tokens, one unrolled graph for decode and verify
        steps), or None: on CPU without a mesh hybrid for float weights, for quantized ones model
        at most `quantized_matmul_cpu.MAX_ROWS` (32) sequences and per_layer past it; model
        elsewhere (`engine.default_layer_loop`, decisions 48, 60, 62 and 80).
      compilation_cache_dir: persistent XLA compilation cache for the entry points to set
        (`set_compilation_cache`: "" disables; None: the JAXINFER_COMPILATION_CACHE environment
        variable, else ~/.cache/jaxinfer/xla). An LLMEngine built directly leaves it alone.
    """

    attention_backend: str = "auto"
    layer_loop: str | None = None
    compilation_cache_dir: str | None = None

    def __post_init__(self):
        _check(self.layer_loop in (None, "model", "per_layer", "hybrid"),
               f"layer_loop must be 'hybrid', 'per_layer', 'model' or None (by platform), got {self.layer_loop!r}")
        try:  # the name only: building a config never starts a JAX backend
            ops.check_backend_name(self.attention_backend)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None


_PARTS = {"cache": CacheConfig, "scheduling": SchedulingConfig, "buckets": BucketConfig,
          "parallel": ParallelConfig, "compile": CompileConfig}
# every setting's name -> the part that holds it (the flat names LLM(...), the CLI and the server take)
FLAT_FIELDS = {f.name: part for part, cls in _PARTS.items() for f in dataclasses.fields(cls)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How the engine uses the device: one config per concern, composed. Build it from flat
    settings with `EngineConfig.of(max_num_seqs=..., page_size=...)` (what `LLM(...)` and the
    flags take), or from the parts; read a setting flat (`config.max_num_seqs`) or by part
    (`config.scheduling.max_num_seqs`).

    Attributes:
      cache: `CacheConfig` (pages, memory, prefix caching).
      scheduling: `SchedulingConfig` (limits, policy, async scheduling, seed).
      buckets: `BucketConfig` (compiled step shapes).
      parallel: `sharding.mesh.ParallelConfig` (tensor / data / sequence parallel sizes; data
        parallelism gives each replica its own KV pages and max_num_seqs / max_num_batched_tokens;
        sequence parallelism splits each step's tokens and the pages, with the reference attention).
      compile: `CompileConfig` (attention backend, layer loop, compilation cache).
    """

    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    scheduling: SchedulingConfig = dataclasses.field(default_factory=SchedulingConfig)
    buckets: BucketConfig = dataclasses.field(default_factory=BucketConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    compile: CompileConfig = dataclasses.field(default_factory=CompileConfig)

    @classmethod
    def of(cls, **settings) -> EngineConfig:
        """From flat settings (`FLAT_FIELDS`); a typed error names any unknown one."""
        unknown = sorted(set(settings) - set(FLAT_FIELDS))
        _check(not unknown, f"unknown engine settings {unknown}; the settings are {sorted(FLAT_FIELDS)}")
        parts = {part: {} for part in _PARTS}
        for name, value in settings.items():
            parts[FLAT_FIELDS[name]][name] = value
        try:
            return cls(**{part: _PARTS[part](**kw) for part, kw in parts.items()})
        except InvalidRequestError:
            raise
        except (ValueError, TypeError) as e:  # ParallelConfig's own check; a value of the wrong type
            raise InvalidRequestError(f"bad engine settings {settings}: {e}") from None

    def __getattr__(self, name: str):
        part = FLAT_FIELDS.get(name)
        if part is None:
            raise AttributeError(f"EngineConfig has no setting {name!r}")
        return getattr(getattr(self, part), name)

    def __post_init__(self):
        for part, cls in _PARTS.items():
            _check(isinstance(getattr(self, part), cls), f"EngineConfig.{part} must be a {cls.__name__}")
        sp = self.parallel.sequence_parallel_size
        if sp > 1:  # checks across parts
            _check(self.parallel.data_parallel_size == 1,
                   "sequence_parallel_size > 1 together with data_parallel_size > 1 is not supported: use one")
            # "auto" is checked on the device, when the engine is built
            _check(self.compile.attention_backend in ("auto", "reference"), SP_NEEDS_REFERENCE)
            _check(self.scheduling.max_num_batched_tokens % sp == 0,
                   f"max_num_batched_tokens ({self.scheduling.max_num_batched_tokens}) must be a multiple of "
                   f"sequence_parallel_size ({sp}): each step's tokens split evenly")


def kv_pool_pages(config: EngineConfig, device: jax.Device, page_bytes: int, page_size: int,
                  max_model_len: int) -> tuple[int, int]:
    """(pages in the pool, the context it serves): `cache.num_pages` as given, else the byte budget
    (`kv_cache_budget`; in a multi-process run the smallest process's) over the bytes of a page. Without
    a configured max_model_len, a budget short of the model's context shrinks the context to what it
    holds, with a warning (under the engine's logger).

    Raises:
      InvalidRequestError: the budget holds less than one max_model_len sequence, or fewer than 2
        pages are asked for (page 0 is reserved).
    """
    if config.cache.num_pages is not None:
        if config.cache.num_pages < 2:
            raise InvalidRequestError(f"num_pages must be at least 2 (page 0 is reserved), got "
                                      f"{config.cache.num_pages}")
        return config.cache.num_pages, max_model_len
    budget = kv_cache_budget(config, device)
    if jax.process_count() > 1:  # every process must build the same pool: the smallest budget wins
        from jax.experimental import multihost_utils

        budget = int(multihost_utils.process_allgather(budget).min())
    num_pages = budget // page_bytes
    max_pages_per_seq = -(-max_model_len // page_size)
    if config.scheduling.max_model_len is None and num_pages < max_pages_per_seq + 1 and num_pages >= 2:
        # No context limit was asked for: use what the budget holds rather than refuse
        # (Gemma 3's 32k context in f32 needs 1.2 GB of cache), and say so.
        fit = (num_pages - 1) * page_size
        logging.getLogger("jaxinfer.engine").warning(
            "the KV-cache budget (%.0f MiB) holds %d tokens, fewer than the model's %d-token context: "
            "max_model_len set to %d (raise kv_cache_memory for more)", budget / 2**20, fit, max_model_len, fit)
        max_model_len, max_pages_per_seq = fit, -(-fit // page_size)
    if num_pages < max_pages_per_seq + 1:
        raise InvalidRequestError(
            f"a KV-cache budget of {budget / 2**20:.0f} MiB holds {num_pages} pages of {page_size} tokens "
            f"({page_bytes / 2**10:.0f} KiB each), fewer than one {max_model_len}-token sequence needs "
            f"({max_pages_per_seq + 1}); raise kv_cache_memory or lower max_model_len")
    return num_pages, max_model_len


def kv_page_bytes(config: EngineConfig, model_config, page_size: int) -> int:
    """Bytes of one KV page of `model_config`'s cache on one tensor-parallel shard."""
    from jaxinfer.paged_attention import PagedKVCache

    backend = config.compile.attention_backend
    return PagedKVCache.bytes_per_page(
        num_layers=model_config.num_layers, page_size=page_size,
        num_kv_heads=model_config.num_kv_heads // config.parallel.tensor_parallel_size,
        head_dim=ops.kv_cache_head_dim(model_config.head_dim, backend), dtype=jnp.dtype(model_config.dtype),
        kv_cache_dtype=config.cache.kv_cache_dtype)


def runner_config(config: EngineConfig, *, page_size: int, num_pages: int, max_model_len: int,
                  speculative: SpeculativeConfig | None = None):
    """The runner's `RunnerConfig`: the pool of every data-parallel replica and sequence shard, and
    the shape buckets (powers of two up to the step budgets unless given).

    Raises:
      InvalidRequestError: speculative decoding with data / sequence parallelism, several processes or
        async scheduling; buckets that do not cover the step budgets.
    """
    from jaxinfer.runner.buckets import RunnerConfig, pow2_buckets

    sched, buckets, pc = config.scheduling, config.buckets, config.parallel
    max_tokens, sp = sched.max_num_batched_tokens, pc.sequence_parallel_size
    if speculative is not None and (pc.data_parallel_size > 1 or sp > 1 or jax.process_count() > 1
                                    or sched.async_scheduling):
        raise InvalidRequestError("speculative decoding runs synchronous steps on one replica: leave "
                                  "async_scheduling unset and data / sequence parallelism at 1 (tensor "
                                  "parallelism works), or drop speculative_config")
    rc = RunnerConfig(page_size=page_size, num_pages=num_pages * pc.data_parallel_size * sp,
                      max_pages_per_seq=-(-max_model_len // page_size),
                      token_buckets=buckets.token_buckets or pow2_buckets(min(16, max_tokens), max_tokens),
                      # sequence parallel: decode steps (T = S) split their tokens over `seq` too
                      seq_buckets=buckets.seq_buckets or pow2_buckets(sp, -(-max(sp, sched.max_num_seqs) // sp) * sp),
                      page_buckets=buckets.page_buckets, q_block=buckets.q_block,
                      max_prefill_seqs=sched.max_prefill_seqs, pages_per_item=buckets.pages_per_item,
                      attention_backend=config.compile.attention_backend, sequence_parallel_size=sp,
                      kv_cache_dtype=config.cache.kv_cache_dtype,
                      num_speculative_tokens=speculative.num_speculative_tokens if speculative is not None else 0,
                      draft_tree=speculative is not None and isinstance(speculative.draft_tree, tuple))
    if rc.draft_tree and not rc.use_decode_items:
        raise InvalidRequestError(f"speculative_config.draft_tree is verified on the decode path's attention "
                                  f"(attention backend \"reference\" or CPU's \"auto\"; backend "
                                  f"{config.compile.attention_backend!r} here): leave draft_tree None (a chain)")
    if rc.token_buckets[-1] < max_tokens or rc.seq_buckets[-1] < sched.max_num_seqs:
        raise InvalidRequestError(f"the largest token bucket ({rc.token_buckets[-1]}) and sequence bucket "
                                  f"({rc.seq_buckets[-1]}) must cover max_num_batched_tokens ({max_tokens}) and "
                                  f"max_num_seqs ({sched.max_num_seqs})")
    return rc


def kv_cache_budget(config: EngineConfig, device: jax.Device) -> int:
    """Bytes for the KV cache: the configured amount, or a share of the device's free memory."""
    if config.cache.kv_cache_memory is not None:
        return config.cache.kv_cache_memory
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return DEFAULT_CPU_KV_CACHE_BYTES
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return int(free * config.cache.memory_fraction)


def default_layer_loop(platform: str, mesh, config, max_num_seqs: int) -> str:
    """On CPU without a mesh: "hybrid" for float weights (decision 80); for quantized weights "model"
    when every decode step fits the native kernel (at most `quantized_matmul_cpu.MAX_ROWS` sequences:
    one graph saves the 30 layer dispatches that, at 4 bits, are a fifth of the step, decision 60),
    else "per_layer". "model" elsewhere."""
    if platform != "cpu" or mesh is not None:
        return "model"
    if config.quantization is None:
        return "hybrid"
    from pallas_kernels.quantized_matmul_cpu import MAX_ROWS

    return "model" if max_num_seqs <= MAX_ROWS else "per_layer"
