"""The attention contract the engine calls, and the choice of implementation behind it.

    write_kv(k_cache, v_cache, k, v, slot_mapping, layer=None) -> (k_cache, v_cache)
    ragged_paged_attention(q, k_cache, v_cache, kv_lens, page_table, cu_q_lens, num_seqs, *,
                           layer=None, sliding_window=None, soft_cap=None, sm_scale=None, q_block=1,
                           max_prefill_seqs=None, backend="auto") -> [T, N, H]
    decode_attention_by_pages(q, k_cache, v_cache, kv_lens, item_seq, item_page, item_pos, *,
                              layer=None, sliding_window=None, soft_cap=None, sm_scale=None,
                              backend="auto") -> [S, N, H]

Arguments are described in `paged_attention_reference`. Backends:

    auto         the platform's kernel: pallas_tpu on TPU, pallas_gpu on GPU, reference on CPU
    reference    pure jnp (XLA), any platform
    pallas       the platform's Pallas kernel; on CPU the GPU kernel in interpret mode
    pallas_tpu   the Mosaic kernel (interpret mode off TPU)
    pallas_gpu   the Triton kernel (interpret mode off GPU)

Head dims the hardware does not tile (64 on TPU, where lanes are 128; non-powers of two on the
Triton kernel) are padded with zeros: the cache is allocated with `kv_cache_head_dim` lanes,
`write_kv` pads new keys/values, attention pads q and slices the output. Zero lanes change no dot
product, and the logit scale stays the model's head dim.

`decode_attention_by_pages` (decode steps as (sequence, page-group) work items) is the reference
path's decode specialisation; the kernels take decode steps through `ragged_paged_attention`
with q_block=1 (`uses_decode_items`). On CPU under "auto", float32 pages go to a native kernel
with the same contract (`decode_attention_cpu`: the reference's gathers and segment sums ran at a
fraction of the memory's speed); "reference" always runs the jnp code.

8-bit caches (`kv_quant.QuantizedPages`) work on every backend: `write_kv` quantizes, the
reference dequantizes the pages it gathers, and the kernels are handed the values and the scales
as separate arrays and dequantize in registers (GPU) or VMEM (TPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.kv_quant import QuantizedPages, write_quantized
from pallas_kernels.paged_attention_reference import (decode_attention_by_pages as _decode_reference,
                                                     ragged_paged_attention_reference, ragged_rows_as_decodes,
                                                     write_kv as _write_kv)

__all__ = ["BACKENDS", "check_backend_name", "decode_attention_by_pages", "kv_cache_dtype_error", "kv_cache_head_dim",
           "ragged_paged_attention", "resolve_backend", "uses_decode_items", "write_kv"]

BACKENDS = ("auto", "reference", "pallas", "pallas_tpu", "pallas_gpu")


def check_backend_name(backend: str) -> str:
    """`backend` if it names a backend (ValueError otherwise); asks nothing of JAX, so configs can
    validate it without starting a JAX backend."""
    if backend not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str = "auto", platform: str | None = None) -> str:
    """The implementation `backend` names on `platform` (default: JAX's default backend):
    "reference", "pallas_tpu" or "pallas_gpu"."""
    check_backend_name(backend)
    platform = platform or jax.default_backend()
    if backend in ("auto", "pallas"):
        if platform == "tpu":
            return "pallas_tpu"
        if platform == "gpu":
            return "pallas_gpu"
        return "reference" if backend == "auto" else "pallas_gpu"
    return backend


def uses_decode_items(backend: str = "auto") -> bool:
    """Whether decode steps go through `decode_attention_by_pages` (else the ragged kernel)."""
    return resolve_backend(backend) == "reference"


def kv_cache_dtype_error(kv_cache_dtype: str, backend: str, device) -> str | None:
    """Why `backend` cannot read `kv_cache_dtype` pages on `device` (None: it can). Every backend
    reads int8 and fp8 pages, except the Triton kernel compiled for a GPU before compute capability
    8.9 (Ada, Hopper): Triton converts float8 e4m3 only from there on."""
    if kv_cache_dtype != "fp8" or device.platform != "gpu" or resolve_backend(backend, "gpu") != "pallas_gpu":
        return None
    major, _, minor = str(getattr(device, "compute_capability", "")).partition(".")
    if major.isdigit() and minor.isdigit() and (int(major), int(minor)) < (8, 9):
        return (f"kv_cache_dtype='fp8' on attention_backend='pallas_gpu' needs a GPU of compute capability >= 8.9 "
                f"(Triton converts float8 e4m3 from there on; this one is {device.compute_capability}): use "
                "kv_cache_dtype='int8', or attention_backend='reference'")
    return None


def kv_cache_head_dim(head_dim: int, backend: str = "auto") -> int:
    """Lanes per KV head in the cache: the head dim padded to what the kernel tiles."""
    impl = resolve_backend(backend)
    if impl == "pallas_tpu":
        return -(-head_dim // 128) * 128
    if impl == "pallas_gpu":
        return max(16, 1 << (head_dim - 1).bit_length())
    return head_dim


def _pad_lanes(x, lanes: int):
    return x if x.shape[-1] == lanes else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, lanes - x.shape[-1])])


def write_kv(k_cache, v_cache, k, v, slot_mapping, layer=None):
    lanes = k_cache.shape[-1]
    k, v = _pad_lanes(k, lanes), _pad_lanes(v, lanes)
    if isinstance(k_cache, QuantizedPages):  # 8-bit pages: quantized per token and head on the way in
        page_size = k_cache.shape[-3]
        page, offset = slot_mapping // page_size, slot_mapping % page_size
        index = (page, offset) if layer is None else (layer, page, offset)
        return write_quantized(k_cache, k, index), write_quantized(v_cache, v, index)
    return _write_kv(k_cache, v_cache, k, v, slot_mapping, layer=layer)


def ragged_paged_attention(q, k_cache, v_cache, kv_lens, page_table, cu_q_lens, num_seqs, *, layer=None,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           sm_scale: float | None = None, q_block: int = 1, max_prefill_seqs: int | None = None,
                           backend: str = "auto") -> jax.Array:
    impl = resolve_backend(backend)
    H = q.shape[-1]
    sm_scale = H ** -0.5 if sm_scale is None else sm_scale
    from pallas_kernels import decode_attention_cpu

    if impl == "reference" and backend == "auto" and decode_attention_cpu.use(q, k_cache):
        # CPU: every query row as a one-query decode on the native kernel (causal over its own
        # sequence's pages), not query blocks over the padded page table (docs/ARCHITECTURE.md)
        lens, item_seq, item_pages, item_pos = ragged_rows_as_decodes(kv_lens, page_table, cu_q_lens, q.shape[0],
                                                                      k_cache.shape[-3])
        return decode_attention_by_pages(q, k_cache, v_cache, lens, item_seq, item_pages, item_pos, layer=layer,
                                         sliding_window=sliding_window, soft_cap=soft_cap, sm_scale=sm_scale)
    q = _pad_lanes(q, k_cache.shape[-1])
    common = dict(layer=layer, sliding_window=sliding_window, soft_cap=soft_cap, sm_scale=sm_scale)
    if impl == "reference":
        out = ragged_paged_attention_reference(q, k_cache, v_cache, kv_lens, page_table, cu_q_lens, num_seqs,
                                               q_block=q_block, max_prefill_seqs=max_prefill_seqs, **common)
        return out[..., :H]
    if isinstance(k_cache, QuantizedPages):  # the kernels read 8-bit values and their scales separately
        common.update(k_scale=k_cache.scale, v_scale=v_cache.scale)
        k_cache, v_cache = k_cache.values, v_cache.values
    args = (q, k_cache, v_cache, kv_lens, page_table, cu_q_lens, num_seqs)
    if impl == "pallas_tpu":
        from pallas_kernels.ragged_paged_attention_tpu import ragged_paged_attention_tpu

        out = ragged_paged_attention_tpu(*args, q_block=q_block, max_prefill_seqs=max_prefill_seqs,
                                         interpret=jax.default_backend() != "tpu",
                                         **common)
    else:
        from pallas_kernels.ragged_paged_attention_gpu import ragged_paged_attention_gpu

        out = ragged_paged_attention_gpu(*args, q_block=q_block, max_prefill_seqs=max_prefill_seqs,
                                         interpret=jax.default_backend() != "gpu", **common)
    return out[..., :H]


def decode_attention_by_pages(q, k_cache, v_cache, kv_lens, item_seq, item_page, item_pos, *, layer=None,
                              sliding_window: int | None = None, soft_cap: float | None = None,
                              sm_scale: float | None = None, backend: str = "auto", tree_base=None,
                              tree_mask=None) -> jax.Array:
    if not uses_decode_items(backend):
        raise ValueError(f"attention backend {backend!r} takes decode steps through ragged_paged_attention")
    from pallas_kernels import decode_attention_cpu

    if backend == "auto" and decode_attention_cpu.use(q, k_cache):
        return decode_attention_cpu.decode_attention_cpu(q, k_cache, v_cache, kv_lens, item_seq, item_page, item_pos,
                                                         layer=layer, sliding_window=sliding_window, sm_scale=sm_scale,
                                                         soft_cap=soft_cap, tree_base=tree_base, tree_mask=tree_mask)
    return _decode_reference(q, k_cache, v_cache, kv_lens, item_seq, item_page, item_pos, layer=layer,
                             sliding_window=sliding_window, sm_scale=sm_scale, soft_cap=soft_cap, tree_base=tree_base,
                             tree_mask=tree_mask)
