"""The quantized matmul on CPU: a small C++ kernel (`csrc/quantized_matmul_cpu.cc`) called through
XLA's FFI, built on first use with the machine's C++ compiler.

Why native code: every XLA:CPU form of "dequantize W, then dot" writes the float weight out (a
fusion cannot feed a dot), and the fused multiply-reduce forms are not vectorised well; all of them
measured slower than simply reading float32 weights (`benchmarks/quant_matmul_forms.py`,
docs/BENCHMARKS.md). The kernel reads each int8 / int4 value once, converts it in registers and
applies the group's scale once per group.

Build: `g++ -O3 -march=native -fopenmp -shared` against jax's FFI headers (`jax.ffi.include_dir()`),
into ~/.cache/jaxinfer/native/ (or $JAXINFER_CACHE) under a name hashed from the source, the flags
and the headers' path, written atomically; later processes load it. With no compiler, a failed
build or JAXINFER_NATIVE_CPU=0, `available()` is False and the XLA reference runs instead (logged
once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

TARGET = "jaxinfer_quantized_matmul"
MAX_ROWS = 32  # larger steps (prefill chunks): XLA's dequantize-then-dot (docs/BENCHMARKS.md)
THREADS = int(os.environ.get("JAXINFER_NATIVE_THREADS", os.cpu_count() or 1))
# steps of fewer rows than this run on one thread: memory-bound, and inside an engine step the OpenMP
# workers contend with XLA's own threads between calls (docs/BENCHMARKS.md, 2026-12-04)
ONE_THREAD_BELOW = int(os.environ.get("JAXINFER_ONE_THREAD_BELOW", 2))
# from this many rows of x the kernel dequantizes panels of W once and reuses them for every row
PANEL_ROWS = int(os.environ.get("JAXINFER_PANEL_ROWS", 8))
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "quantized_matmul_cpu.cc")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


def _cache_dir() -> str:
    base = os.environ.get("JAXINFER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxinfer")
    return os.path.join(base, "native")


def build(source: str = SOURCE) -> str:
    """Compiles `source` (a file of csrc/) if needed; returns the shared library's path (raises on
    failure)."""
    include = jax.ffi.include_dir()
    with open(source, "rb") as f:
        key = hashlib.sha256(f.read() + " ".join(FLAGS).encode() + include.encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    path = os.path.join(out_dir, f"{os.path.splitext(os.path.basename(source))[0]}-{key}.so")
    if os.path.exists(path):
        return path
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ / c++ / $CXX) on PATH")
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-w", f"-I{include}", source, "-o", tmp], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(tmp, path)  # atomic: a concurrent build of the same key writes the same file
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"building {source} failed: {e.stderr.strip()[-2000:]}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def register(source: str, symbol: str, target: str, what: str, switch: str | None = None) -> bool:
    """Builds `source`, registers its FFI handler `symbol` as the CPU custom call `target`; False (and
    `what` is logged as unavailable) when JAXINFER_NATIVE_CPU=0 or the env var `switch` is 0, or the
    build or registration fails (no compiler, an FFI mismatch): callers then keep the XLA path."""
    if os.environ.get("JAXINFER_NATIVE_CPU", "1") == "0" or (switch and os.environ.get(switch, "1") == "0"):
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(build(source))
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        return True
    except Exception as e:
        logger.warning("the native CPU %s is unavailable (%s); using XLA", what, e)
        return False


@functools.cache
def available() -> bool:
    """Whether the native kernel is built and registered with XLA (tries once per process)."""
    return register(SOURCE, "JaxinferQuantizedMatmul", TARGET, "quantized matmul")


def quantized_matmuls_cpu(x, weights, *, transpose: bool = False, out_dtype=None) -> list[jax.Array]:
    """[x @ W for W in weights] in one call of the native kernel (threads split the weights' joint
    columns: q, k and v, or gate and up, run as one threaded call). weights: (values, scale,
    offset or None, bits) per weight, each as `quantized_matmul` takes them; x is computed in float32.

    Raises:
      RuntimeError: the kernel could not be built here (see `available`).
    """
    if not available():
        raise RuntimeError("the native CPU quantized matmul could not be built here; use the reference backend")
    out_dtype = out_dtype or x.dtype
    K = x.shape[-1]
    x2 = x.reshape(-1, K).astype(jnp.float32)
    operands, outs, bits, groups, has_offset = [], [], [], [], []
    no_offset = jnp.zeros((1, 1), jnp.float32)
    for values, scale, offset, b in weights:
        n = values.shape[0] if transpose else values.shape[-1]
        groups.append(K // (scale.shape[1] if transpose else scale.shape[0]))
        bits.append(b)
        has_offset.append(offset is not None)
        operands += [values, scale.astype(jnp.float32), no_offset if offset is None else offset.astype(jnp.float32)]
        outs.append(jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32))
    ys = jax.ffi.ffi_call(TARGET, outs)(
        x2, *operands, bits=np.asarray(bits, np.int64), group=np.asarray(groups, np.int64),
        has_offset=np.asarray(has_offset, np.int64), transpose=np.int64(transpose),
        threads=np.int64(1 if x2.shape[0] < ONE_THREAD_BELOW else THREADS),
        panel_rows=np.int64(PANEL_ROWS))
    return [y.reshape(*x.shape[:-1], y.shape[-1]).astype(out_dtype) for y in ys]


def quantized_matmul_cpu(x, values, scale, offset=None, *, bits: int, transpose: bool = False, out_dtype=None):
    """`quantized_matmul` (same contract) on the native kernel; x is computed in float32.

    Raises:
      RuntimeError: the kernel could not be built here (see `available`).
    """
    return quantized_matmuls_cpu(x, [(values, scale, offset, bits)], transpose=transpose, out_dtype=out_dtype)[0]
