"""The native CPU float32 matmul of few-token steps (C++ through XLA's FFI) against numpy, and the
property the engine relies on: an output element is computed with the same float operations
whatever the rows of x, the blocks or the threads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import float_matmul_cpu as native
from pallas_kernels import quantized_matmul as qm

pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler to build the native kernel")


def _call(x, weights, transpose=False):
    return jax.jit(lambda x, ws: native.float_matmuls_cpu(x, ws, transpose=transpose))(x, weights)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("M, K, N", [(1, 64, 48), (2, 96, 200), (3, 100, 13), (4, 576, 1536), (5, 64, 100),
                                     (6, 1536, 576), (7, 40, 72), (8, 576, 192), (9, 128, 40), (16, 72, 24),
                                     (70, 64, 24)])
def test_native_matches_numpy(transpose, M, K, N):
    """Tails of K (not a multiple of the 8-input chunk) and of N (not a whole vector), every group
    of rows (1-4 in one block, 5-8 as groups of 4, past 64 a second pass), one and two threads."""
    rng = np.random.default_rng(M * 1000 + K + N)
    w = rng.normal(size=(N, K) if transpose else (K, N)).astype(np.float32)
    x = rng.normal(size=(M, K)).astype(np.float32)
    (got,) = _call(jnp.asarray(x), [jnp.asarray(w)], transpose)
    want = x.astype(np.float64) @ (w.T if transpose else w).astype(np.float64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("K, N", [(576, 1536), (100, 37)])
def test_each_row_is_computed_as_it_would_be_alone(transpose, K, N):
    """Rows of a step of M tokens equal bitwise that row in a step of its own (any M up to 8, and
    past a block of 4 rows), so a verify step's logits at each position are a decode step's."""
    rng = np.random.default_rng(K + N)
    w = jnp.asarray(rng.normal(size=(N, K) if transpose else (K, N)).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(8, K)).astype(np.float32))
    alone = [np.asarray(_call(x[i:i + 1], [w], transpose)[0]) for i in range(8)]
    for M in range(2, 9):
        (y,) = _call(x[:M], [w], transpose)
        for i in range(M):
            np.testing.assert_array_equal(np.asarray(y)[i:i + 1], alone[i], err_msg=f"row {i} of {M}")


@pytest.mark.parametrize("transpose", [False, True])
def test_the_threads_do_not_change_a_bit(monkeypatch, transpose):
    """One thread, two (the halves of K) and six (each half's columns split three ways) give the
    same bits."""
    from pallas_kernels import quantized_matmul_cpu

    rng = np.random.default_rng(7)
    K, N = 576, 1000
    w = jnp.asarray(rng.normal(size=(N, K) if transpose else (K, N)).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(5, K)).astype(np.float32))
    outs = []
    for threads in (1, 2, 6):
        monkeypatch.setattr(quantized_matmul_cpu, "THREADS", threads)
        outs.append(np.asarray(_call(x, [w], transpose)[0]))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_tail_columns_compute_what_the_vector_blocks_do():
    """Columns past the last whole vector (the plain loop) equal bitwise the same columns computed
    by the vector blocks (a weight whose columns start where the tail's do)."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(100, 13)).astype(np.float32))  # columns 8..12: the plain loop
    x = jnp.asarray(rng.normal(size=(3, 100)).astype(np.float32))
    (full,) = _call(x, [w])
    (shifted,) = _call(x, [w[:, 5:]])  # 8 columns: all vector blocks; column 3 here is column 8 there
    np.testing.assert_array_equal(np.asarray(full)[:, 8:], np.asarray(shifted)[:, 3:])
    # transposed (the head): outputs past the last block of 4 take the plain loop
    e = jnp.asarray(rng.normal(size=(13, 64)).astype(np.float32))  # output 12: the plain loop
    x = jnp.asarray(rng.normal(size=(3, 64)).astype(np.float32))
    (full,) = _call(x, [e], True)
    (shifted,) = _call(x, [e[9:]], True)  # 4 outputs: one vector block; output 3 here is output 12 there
    np.testing.assert_array_equal(np.asarray(full)[:, 12:], np.asarray(shifted)[:, 3:])


def test_several_weights_in_one_call():
    rng = np.random.default_rng(1)
    K = 576
    ws = [jnp.asarray(rng.normal(size=(K, n)).astype(np.float32)) for n in (576, 192, 192)]
    x = jnp.asarray(rng.normal(size=(4, K)).astype(np.float32))
    got = _call(x, ws)
    assert [g.shape for g in got] == [(4, 576), (4, 192), (4, 192)]
    for g, w in zip(got, ws):
        (alone,) = _call(x, [w])
        np.testing.assert_array_equal(np.asarray(g), np.asarray(alone))


def _lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_float_matmuls_takes_the_kernel_only_where_it_pays():
    """`float_matmuls` (what the model calls): the native kernel for float32 steps of MIN_ROWS to
    MAX_ROWS rows under "auto"; XLA's dot for one row, for more rows, for bfloat16, under "reference"
    (a mesh: XLA partitions the dot) and with the kernel switched off."""
    w = jnp.ones((64, 32), jnp.float32)
    call = lambda x: qm.float_matmuls(x, [w])[0]  # noqa: E731
    x = lambda m, dt=jnp.float32: jnp.ones((m, 64), dt)  # noqa: E731
    assert native.TARGET in _lowered(call, x(native.MIN_ROWS))
    assert native.TARGET in _lowered(call, x(native.MAX_ROWS))
    assert native.TARGET not in _lowered(call, x(native.MAX_ROWS + 1))
    if native.MIN_ROWS > 1:
        assert native.TARGET not in _lowered(call, x(1))
    assert native.TARGET not in _lowered(lambda x: qm.float_matmuls(x, [w.astype(jnp.bfloat16)])[0],
                                         x(4, jnp.bfloat16))
    with qm.matmul_backend("reference"):
        assert native.TARGET not in _lowered(call, x(4))
    # the output projection's form: a [V, D] embedding, float32 logits
    emb = jnp.ones((40, 64), jnp.float32)
    head = lambda x: qm.float_matmuls(x, [emb], transpose=True, preferred_element_type=jnp.float32)[0]  # noqa: E731
    assert native.TARGET in _lowered(head, x(4))
    np.testing.assert_allclose(np.asarray(jax.jit(head)(x(4))), np.full((4, 40), 64.0))
    np.testing.assert_allclose(np.asarray(jax.jit(head)(x(1))), np.full((1, 40), 64.0))
