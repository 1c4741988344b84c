"""Engine settings (`EngineConfig`), the KV-cache byte budget, and the process-wide compilation
cache that the entry points set. Building a config never starts a JAX backend (a multi-host run
calls jax.distributed.initialize first); what needs the device is resolved by `LLMEngine`.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from jaxinfer.errors import InvalidRequestError
from pallas_kernels import ops
from sharding.mesh import ParallelConfig

DEFAULT_PAGE_SIZE = {"cpu": 16, "gpu": 16, "tpu": 64}
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # XLA:CPU reports no memory limit: 1 GiB unless told
DEFAULT_MEMORY_FRACTION = 0.9  # of the accelerator memory left free after the weights
SP_NEEDS_REFERENCE = ("sequence_parallel_size > 1 needs attention_backend='reference': the Pallas kernels do not "
                       "return the log-sum-exp that combines the sequence shards yet")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How the engine uses the device.

    Attributes:
      max_model_len: context limit in tokens (None: the model's own, lowered with a warning to what
        the KV-cache budget holds when that is less).
      max_num_seqs: most requests running at once.
      max_num_batched_tokens: most tokens computed per step (prefill chunks are cut to fit).
      page_size: tokens per KV page (None: 16 on CPU/GPU, 64 on TPU).
      kv_cache_memory: bytes for the KV cache (None: `memory_fraction` of the free accelerator
        memory; 1 GiB on CPU).
      memory_fraction: share of the free accelerator memory given to the KV cache.
      num_pages: an exact page count (overrides the memory budget; for tests).
      enable_prefix_caching: reuse computed prompt pages across requests.
      policy: "fcfs" or "priority".
      token_buckets, seq_buckets, page_buckets: step shapes (None: powers of two up to the limits).
      q_block: query rows per attention block of a prefill chunk.
      max_prefill_seqs: most requests given a multi-token (prefill) chunk per step.
      pages_per_item: KV pages per work item of decode attention.
      attention_backend: `pallas_kernels.ops` backend.
      tensor_parallel_size: devices the heads, MLP columns and vocabulary are split over
        (`sharding/`; vLLM's name).
      data_parallel_size: model replicas, each with its own KV pages (num_pages / the memory
        budget apply per replica) and its own max_num_seqs / max_num_batched_tokens.
      sequence_parallel_size: devices each step's tokens and the KV pages are split over (long
        prompts; num_pages / the memory budget apply per device); the reference attention backend.
      layer_loop: "per_layer" (one compiled layer run once per layer from the host: fast steps
        and fast compiles on CPU), "model" (one graph per step over the model's own loop, scanned
        or unrolled), or None: per_layer on CPU without a mesh, model elsewhere (decision 48).
      async_scheduling: schedule and build step N + 1 while the device runs step N (host time
        hidden behind the device's); None: on for one GPU / TPU in one process, off on CPU (where
        host and "device" share the cores: measured slower, decision 50) and with tensor / data /
        sequence parallelism or several hosts (synchronous steps); True / False: as asked.
      compilation_cache_dir: persistent XLA compilation cache for the entry points to set
        (`set_compilation_cache`: "" disables; None: the JAXINFER_COMPILATION_CACHE environment
        variable, else ~/.cache/jaxinfer/xla). An LLMEngine built directly leaves it alone.
      seed: seeds requests that set none.
    """

    max_model_len: int | None = None
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    page_size: int | None = None
    kv_cache_memory: int | None = None
    memory_fraction: float = DEFAULT_MEMORY_FRACTION
    num_pages: int | None = None
    enable_prefix_caching: bool = True
    policy: str = "fcfs"
    token_buckets: tuple[int, ...] | None = None
    seq_buckets: tuple[int, ...] | None = None
    page_buckets: tuple[int, ...] | None = None
    q_block: int = 32
    max_prefill_seqs: int = 4
    pages_per_item: int = 2
    attention_backend: str = "auto"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    sequence_parallel_size: int = 1
    layer_loop: str | None = None
    async_scheduling: bool | None = None
    compilation_cache_dir: str | None = None
    seed: int = 0

    def __post_init__(self):
        def bad(msg):
            raise InvalidRequestError(msg)

        if self.max_num_seqs <= 0:
            bad(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            bad(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                f"({self.max_num_seqs}): every running request needs a token per step")
        if self.max_model_len is not None and self.max_model_len <= 1:
            bad(f"max_model_len must be at least 2 tokens, got {self.max_model_len}")
        if self.page_size is not None and self.page_size <= 0:
            bad(f"page_size must be positive, got {self.page_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            bad(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if not 0 < self.memory_fraction <= 1:
            bad(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if min(self.max_prefill_seqs, self.q_block, self.pages_per_item) <= 0:
            bad(f"max_prefill_seqs, q_block and pages_per_item must be positive, got {self.max_prefill_seqs}, "
                f"{self.q_block}, {self.pages_per_item}")
        if self.policy not in ("fcfs", "priority"):
            bad(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.layer_loop not in (None, "model", "per_layer"):
            bad(f"layer_loop must be 'per_layer', 'model' or None (by platform), got {self.layer_loop!r}")
        try:  # names only: building a config never starts a JAX backend
            self.parallel_config
            ops.check_backend_name(self.attention_backend)
        except ValueError as e:
            bad(str(e))
        if self.sequence_parallel_size > 1:
            if self.data_parallel_size > 1:
                bad("sequence_parallel_size > 1 together with data_parallel_size > 1 is not supported: use one")
            if self.attention_backend not in ("auto", "reference"):  # "auto" is checked on the device
                bad(SP_NEEDS_REFERENCE)
            if self.max_num_batched_tokens % self.sequence_parallel_size:
                bad(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be a multiple of "
                    f"sequence_parallel_size ({self.sequence_parallel_size}): each step's tokens split evenly")

    @property
    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(data_parallel_size=self.data_parallel_size,
                              sequence_parallel_size=self.sequence_parallel_size,
                              tensor_parallel_size=self.tensor_parallel_size)


def set_compilation_cache(path: str | None) -> str | None:
    """Points JAX's persistent compilation cache at `path`, or turns it off; returns the directory
    in use (None: off). The entry points call it (`LLM`, the CLI, the server): the cache is a
    process-wide JAX setting, so an engine never changes it behind its caller's back.

    Args:
      path: a directory; "" disables the cache (also after an earlier call enabled it); None: the
        JAXINFER_COMPILATION_CACHE environment variable, else ~/.cache/jaxinfer/xla.
    """
    from jax._src import compilation_cache  # reset_cache: JAX reads the setting once, then caches it

    if path is None:
        path = os.environ.get("JAXINFER_COMPILATION_CACHE",
                              os.path.join(os.path.expanduser("~"), ".cache", "jaxinfer", "xla"))
    if not path:
        if jax.config.jax_enable_compilation_cache:
            jax.config.update("jax_enable_compilation_cache", False)
            compilation_cache.reset_cache()
        return None
    os.makedirs(path, exist_ok=True)
    if not jax.config.jax_enable_compilation_cache or jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        compilation_cache.reset_cache()
    return path


def kv_cache_budget(config: EngineConfig, device: jax.Device) -> int:
    """Bytes for the KV cache: the configured amount, or a share of the device's free memory."""
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return DEFAULT_CPU_KV_CACHE_BYTES
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return int(free * config.memory_fraction)
