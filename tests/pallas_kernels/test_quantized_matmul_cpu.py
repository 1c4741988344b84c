"""The native CPU quantized matmul (C++ through XLA's FFI) against the jnp reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.quantization import pack_int4, quantize
from pallas_kernels import quantized_matmul as qm
from pallas_kernels import quantized_matmul_cpu as native

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler to build the native kernel")


def _weights(rng, K, N, bits, group, transpose, offset=True):
    w = rng.normal(size=(N, K) if transpose else (K, N)).astype(np.float32)
    axis = 1 if transpose else 0
    t = quantize(w, bits=bits, group=group, axis=axis)
    values = pack_int4(t.values, axis, group) if bits == 4 else t.values
    off = None if t.offset is None or not offset else jnp.asarray(t.offset)
    return jnp.asarray(values), jnp.asarray(t.scale), off


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("M, K, N, group", [(1, 64, 48, 32), (1, 96, 200, 32), (3, 96, 200, 32), (4, 64, 100, 32),
                                           (17, 160, 72, 16), (2, 128, 130, 128), (1, 576, 1536, 32),
                                           (2, 256, 72, 32), (5, 128, 104, 16), (16, 64, 40, 8),
                                           # from PANEL_ROWS rows: dequantized panels, 6-row blocks + a tail
                                           (8, 96, 200, 32), (32, 576, 192, 32), (45, 640, 136, 64),
                                           (33, 576, 1536, 32)])
def test_native_matches_the_reference(bits, transpose, M, K, N, group):
    rng = np.random.default_rng(M * 1000 + K + N)
    values, scale, offset = _weights(rng, K, N, bits, group, transpose)
    x = jnp.asarray(rng.normal(size=(M, K)), jnp.float32)
    got = jax.jit(lambda *a: native.quantized_matmul_cpu(*a, bits=bits, transpose=transpose))(x, values, scale,
                                                                                           offset)
    want = qm.quantized_matmul_reference(x, values, scale, offset, bits=bits, transpose=transpose)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("M", [1, 3, 32])
def test_several_weights_in_one_call_with_mixed_containers(M):
    """q / k / v in one call: joint columns split over threads, each weight its own bits and group."""
    rng = np.random.default_rng(M)
    K = 256
    specs = [(320, 32, 4, True), (64, 32, 8, False), (136, 64, 4, True), (1000, 16, 8, True)]
    weights = [(*_weights(rng, K, N, bits, group, False, offset), bits) for N, group, bits, offset in specs]
    x = jnp.asarray(rng.normal(size=(M, K)), jnp.float32)
    got = jax.jit(lambda x: native.quantized_matmuls_cpu(x, weights))(x)
    assert [g.shape for g in got] == [(M, N) for N, *_ in specs]
    for g, (values, scale, offset, bits) in zip(got, weights):
        want = qm.quantized_matmul_reference(x, values, scale, offset, bits=bits)
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))
    # quantized_matmuls (what the model calls) gives the same through the reference backend
    with qm.matmul_backend("reference"):
        ref = qm.quantized_matmuls(x, weights)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-5 * float(jnp.abs(r).max()))


def test_int8_without_offsets_bf16_activations_and_batch_dims():
    rng = np.random.default_rng(1)
    values, scale, _ = _weights(rng, 96, 40, 8, 32, False)
    x = jnp.asarray(rng.normal(size=(2, 3, 96)), jnp.bfloat16)
    got = native.quantized_matmul_cpu(x, values, scale, None, bits=8)
    want = qm.quantized_matmul_reference(x.astype(jnp.float32), values, scale, None, bits=8)
    assert got.shape == (2, 3, 40) and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=2e-2, atol=2e-2)


def test_auto_on_cpu_takes_the_native_kernel_for_small_steps_only(monkeypatch):
    rng = np.random.default_rng(2)
    values, scale, offset = _weights(rng, 64, 32, 4, 32, False)
    calls = []
    kernel = native.quantized_matmul_cpu
    monkeypatch.setattr(native, "quantized_matmul_cpu", lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
    for rows in (1, native.MAX_ROWS, native.MAX_ROWS + 1):
        qm.quantized_matmul(jnp.ones((rows, 64)), values, scale, offset, bits=4)
    assert calls == [(1, 64), (native.MAX_ROWS, 64)]
    with qm.matmul_backend("reference"):  # what a step under a mesh asks for
        qm.quantized_matmul(jnp.ones((1, 64)), values, scale, offset, bits=4)
    assert len(calls) == 2


def test_no_compiler_falls_back_to_the_reference(monkeypatch, tmp_path):
    native.available.cache_clear()
    try:
        monkeypatch.setenv("JAXINFER_CACHE", str(tmp_path))
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        monkeypatch.setattr(native.shutil, "which", lambda name: None)
        assert not native.available()
        with pytest.raises(RuntimeError, match="could not be built"):
            native.quantized_matmul_cpu(jnp.ones((1, 64)), *_weights(np.random.default_rng(3), 64, 8, 8, 32, False),
                                        bits=8)
    finally:
        native.available.cache_clear()
    monkeypatch.undo()
    assert native.available()  # rebuilt state for the rest of the session


def test_one_row_steps_run_on_one_thread():
    """A one-row step (batch-1 decode) asks the kernel for one thread; larger steps for THREADS (the
    kernel still keeps small matrices on one, by their size)."""
    import re

    values, scale, offset = _weights(np.random.default_rng(5), 64, 32, 8, 32, False)

    def threads(rows):
        text = jax.jit(lambda x: native.quantized_matmul_cpu(x, values, scale, offset, bits=8)).lower(
            jnp.ones((rows, 64))).as_text()
        return {int(t) for t in re.findall(r"threads = (\d+)", text)}

    assert native.ONE_THREAD_BELOW == 2
    assert threads(1) == {1} and threads(2) == threads(8) == {native.THREADS}
