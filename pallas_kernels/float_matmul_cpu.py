"""The float32 matmul of a step of few tokens on CPU: a small C++ kernel (`csrc/float_matmul_cpu.cc`)
called through XLA's FFI, built on first use like the quantized one (`quantized_matmul_cpu.build`).

Why: XLA:CPU's dot reads a float32 weight at the memory's speed for one row of x but at less than
half of it for 2-8 rows (docs/BENCHMARKS.md), so a decode step of 8 sequences, or one request
verifying k drafts, cost 2-3x a step of one. The kernel reads every weight once per call whatever
the rows, and computes each output element with the same float operations whatever the rows or
threads: a verify step's logits at each position equal bitwise what a decode step of that position
alone gives (for the matmuls; tested).

    float_matmuls_cpu(x, [W, ...], transpose=False)   [x @ W, ...]; transpose: W [N, K] (x @ W.T)
    MIN_ROWS, MAX_ROWS                                steps of fewer or more rows keep XLA's dot
    available()                                       built and registered (False: use XLA)

JAXINFER_NATIVE_CPU=0 turns it off with the quantized kernel; JAXINFER_FLOAT_NATIVE=0 turns off only
this one.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import quantized_matmul_cpu

TARGET = "jaxinfer_float_matmul"
# the rows of x it takes (docs/BENCHMARKS.md, 2026-12-05: SmolLM2's 30 layers and head)
MIN_ROWS = int(os.environ.get("JAXINFER_FLOAT_NATIVE_MIN_ROWS", 2))
MAX_ROWS = int(os.environ.get("JAXINFER_FLOAT_NATIVE_MAX_ROWS", 8))
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "float_matmul_cpu.cc")


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA (tries once per process)."""
    return quantized_matmul_cpu.register(SOURCE, "JaxinferFloatMatmul", TARGET, "float matmul", "JAXINFER_FLOAT_NATIVE")


def float_matmuls_cpu(x, weights, *, transpose: bool = False) -> list[jax.Array]:
    """[x @ W for W in weights] (transpose: x @ W.T, W [N, K]) in one call of the native kernel, in
    float32; x [..., K], each W float32.

    Raises:
      RuntimeError: the kernel could not be built here (see `available`).
    """
    if not available():
        raise RuntimeError("the native CPU float matmul could not be built here; use XLA's dot")
    K = x.shape[-1]
    x2 = x.reshape(-1, K).astype(jnp.float32)
    outs = [jax.ShapeDtypeStruct((x2.shape[0], w.shape[0] if transpose else w.shape[1]), jnp.float32)
            for w in weights]
    ys = jax.ffi.ffi_call(TARGET, outs)(x2, *weights, transpose=np.int64(transpose),
                                        threads=np.int64(quantized_matmul_cpu.THREADS))
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


def use(x, weights) -> bool:
    """Whether `float_matmuls_cpu` should compute x @ these weights: on the CPU backend, float32 x and
    weights, a step of MIN_ROWS to MAX_ROWS rows, the kernel available."""
    if jax.default_backend() != "cpu" or x.dtype != jnp.float32 or any(w.dtype != jnp.float32 for w in weights):
        return False
    return MIN_ROWS <= math.prod(x.shape[:-1]) <= MAX_ROWS and available()
