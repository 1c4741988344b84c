"""The quantized-matmul Pallas kernels (Triton and Mosaic) against `quantized_matmul_reference`, run in
interpret mode on CPU, plus lowering checks (Triton for CUDA, Mosaic for TPU) that need no device.

COMMON runs on both kernels: int8 and int4, float32 and bfloat16 activations, groups of 16 / 32 / 64
and per-channel, shapes that need padding, transposed weights, int8 without an offset, leading
batch dims. Each kernel then has cases for its own tiling paths (several K steps, a ragged last K
step, groups spanning steps). The TPU interpreter fills out-of-bounds block reads with NaN, so a
partial edge block that leaked into the output would show.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.quantization import pack_int4, quantize
from pallas_kernels.quantized_matmul import quantized_matmul, quantized_matmul_reference, split_int4_activations
from pallas_kernels.quantized_matmul_gpu import quantized_matmul_gpu
from pallas_kernels.quantized_matmul_tpu import choose_block_k, quantized_matmul_tpu

F32, BF16 = jnp.float32, jnp.bfloat16

# (bits, group, x's leading dims, K, N, x dtype, options)
COMMON = [
    (8, 96, (3,), 96, 72, F32, dict(offset=False)),  # per-channel (G = K), M / N padded
    (8, 32, (2, 3), 96, 72, BF16, {}),  # leading batch dims, an int8 offset
    (8, 16, (17,), 160, 200, F32, {}),
    (4, 32, (17,), 160, 200, F32, {}),
    (4, 16, (5,), 64, 48, BF16, dict(transpose=True)),
    (4, 64, (2, 3), 128, 136, BF16, dict(out_dtype=F32)),
    (8, 64, (4,), 128, 40, F32, dict(transpose=True, offset=False)),
]
GPU_ONLY = [
    (8, 40, (17,), 200, 72, F32, dict(block_k=64)),  # steps cut groups; K padded 200 -> 256
    (4, 32, (3,), 320, 100, BF16, dict(block_k=16, transpose=True)),  # 10 steps, one group each
    (4, 64, (40,), 256, 130, F32, dict(block_m=16, block_n=32, block_k=16)),  # a [3, 5] grid, 2 steps a group
    (8, 256, (2, 2), 256, 72, F32, dict(block_k=32, offset=False)),  # per-channel: one scale row a step
]
TPU_ONLY = [
    (4, 32, (17,), 512, 200, F32, dict(block_m=16, block_n=128, block_k=128)),  # scale tiles, partial M / N blocks
    (4, 32, (3,), 640, 136, BF16, dict(block_k=128)),  # scale tiles, ragged last step (Kv 320)
    (8, 64, (17,), 320, 200, F32, dict(block_m=16, block_n=128, block_k=128)),  # sliced scales, ragged, padded
    (8, 64, (3,), 512, 72, BF16, dict(block_k=256, transpose=True)),  # sliced scales (4 rows a step)
    (8, 384, (2, 2), 384, 72, F32, dict(block_k=128, offset=False)),  # per-channel over 3 steps
    (8, 256, (3,), 512, 72, F32, dict(block_k=128)),  # two steps per group
    (8, 1024, (2,), 1024, 128, BF16, {}),  # default blocks: 2 steps of 512
]


def _weight(bits: int, group: int, k: int, n: int, *, transpose: bool, offset: bool, seed: int):
    """(values, scale, offset) of a random [k, n] weight (stored [n, k] when transposed); int8
    gets a random offset when `offset` (as a GGUF's Q5 blocks carry a minimum)."""
    rng = np.random.default_rng(seed)
    axis = 1 if transpose else 0
    t = quantize(rng.normal(size=(n, k) if transpose else (k, n)).astype(np.float32), bits=bits, group=group,
                 axis=axis)
    values = pack_int4(t.values, axis, group) if bits == 4 else t.values
    off = t.offset
    if bits == 8 and offset:
        off = (0.01 * rng.normal(size=t.scale.shape)).astype(np.float32)
    return jnp.asarray(values), jnp.asarray(t.scale), None if off is None else jnp.asarray(off)


def _check(kernel, bits, group, lead, k, n, dtype, options, seed=0):
    options = dict(options)
    transpose, offset = options.pop("transpose", False), options.pop("offset", True)
    out_dtype = options.pop("out_dtype", None)
    weight = _weight(bits, group, k, n, transpose=transpose, offset=offset, seed=seed)
    x = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(*lead, k)), dtype)
    kw = dict(bits=bits, transpose=transpose, out_dtype=out_dtype)
    got = kernel(x, *weight, interpret=True, **kw, **options)
    want = quantized_matmul_reference(x, *weight, **kw)
    assert got.shape == want.shape == (*lead, n) and got.dtype == want.dtype
    # float32: accumulation order only; bfloat16: one rounding of the output (and of W)
    tol = 1e-4 if got.dtype == jnp.float32 and x.dtype == jnp.float32 else 2e-2
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def _ids(case):
    bits, group, lead, k, n, dtype, options = case
    extra = "-".join(f"{key}={getattr(v, '__name__', v)}" for key, v in options.items())
    shape = "x".join(map(str, (*lead, k, n)))
    return f"int{bits}-g{group}-{shape}-{jnp.dtype(dtype).name}" + (f"-{extra}" if extra else "")


@pytest.mark.parametrize("case", COMMON + GPU_ONLY, ids=_ids)
def test_gpu_kernel_matches_reference(case):
    _check(quantized_matmul_gpu, *case)


@pytest.mark.parametrize("case", COMMON + TPU_ONLY, ids=_ids)
def test_tpu_kernel_matches_reference(case):
    _check(quantized_matmul_tpu, *case)


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_dispatch_runs_the_kernels(backend):
    """On CPU, `quantized_matmul` runs each Pallas backend's kernel in interpret mode."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 64)), F32)
    weight = _weight(4, 32, 64, 48, transpose=False, offset=True, seed=1)
    got = quantized_matmul(x, *weight, bits=4, backend=backend)
    want = quantized_matmul(x, *weight, bits=4, backend="reference")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_int4_split_meets_each_packed_row():
    x = jnp.arange(2 * 64, dtype=F32).reshape(2, 64)
    lo, hi = split_int4_activations(x, 32)
    assert lo.shape == hi.shape == (2, 32)
    assert lo[0, :16].tolist() == list(range(16)) and hi[0, :16].tolist() == list(range(16, 32))
    assert lo[1, 16:].tolist() == list(range(64 + 32, 64 + 48)) and hi[1, 16:].tolist() == list(range(64 + 48, 128))


@pytest.mark.parametrize("kv, rows_per_group, expected", [
    (320, 16, 320),  # fits one step
    (1024, 512, 512),
    (1536, 16, 512),
    (1280, 64, 256),  # 512 and 384 leave a ragged step; 256 divides
    (1000, 8, 512),  # nothing divides: a ragged last step
    (4000, 4000, 4000),  # no multiple of 128 fits the group: one step
])
def test_tpu_block_k_fits_groups(kv, rows_per_group, expected):
    assert choose_block_k(kv, rows_per_group) == expected


def test_bad_shapes_and_blocks_are_refused():
    x = jnp.ones((2, 64), F32)
    values, scale, offset = _weight(8, 32, 64, 256, transpose=False, offset=True, seed=0)
    with pytest.raises(ValueError, match="do not fit"):
        quantized_matmul_gpu(jnp.ones((2, 32), F32), values, scale, offset, bits=8, interpret=True)
    with pytest.raises(ValueError, match="do not fit"):  # int4 needs an offset
        quantized_matmul_tpu(x, values[:32].view(jnp.uint8), scale, None, bits=4, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        quantized_matmul_gpu(x, values, scale, offset, bits=8, block_n=24, interpret=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        quantized_matmul_tpu(x, values, scale, offset, bits=8, block_n=192 - 8, interpret=True)


def _abstract_args(bits, k, n, group, dtype, transpose):
    kv = k // 2 if bits == 4 else k
    stored = (n, kv) if transpose else (kv, n)
    grouped = (n, k // group) if transpose else (k // group, n)
    sds = jax.ShapeDtypeStruct
    return (sds((5, k), dtype), sds(stored, jnp.uint8 if bits == 4 else jnp.int8), sds(grouped, F32),
            sds(grouped, F32))


LOWERING = [(8, 1024, 1024, F32, False, {}), (4, 1024, 32, BF16, True, dict(block_k=128)),
            (8, 640, 64, F32, False, dict(block_k=256)), (8, 512, 256, BF16, False, dict(block_k=128))]


@pytest.mark.parametrize("bits, k, group, dtype, transpose, blocks", LOWERING)
def test_lowers_for_gpu_and_tpu(bits, k, group, dtype, transpose, blocks):
    """Both kernels lower on CPU for their device (Triton IR for CUDA, Mosaic for TPU); covers the
    TPU kernel's scale tiles, sliced scales and one-row scales, and its tiling checks."""
    args = _abstract_args(bits, k, 384, group, dtype, transpose)
    gpu = functools.partial(quantized_matmul_gpu, bits=bits, transpose=transpose)
    tpu = functools.partial(quantized_matmul_tpu, bits=bits, transpose=transpose, **blocks)
    assert "xla.gpu.triton" in jax.jit(gpu).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "tpu_custom_call" in jax.jit(tpu).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
