"""Filling the model's stacked [L, ...] parameters one source tensor at a time (GGUF and HF readers)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def stack_layers(read_layer: Callable[[int], np.ndarray], num_layers: int, dtype, *, to_device: bool = False):
    """[L, ...] array of `read_layer(0..L-1)`, allocated once from the first layer's shape.

    On the host it is a numpy array; with `to_device` a jax array on the default device, filled
    in place, so the host holds one layer's tensor at a time."""
    stacked = None
    for i in range(num_layers):
        w = read_layer(i)
        if stacked is None:  # preallocate [L, ...] rather than stacking copies
            if to_device:
                import jax.numpy as jnp

                stacked = jnp.zeros((num_layers, *w.shape), dtype)
            else:
                stacked = np.empty((num_layers, *w.shape), dtype=dtype)
        if to_device:
            stacked = set_block(stacked, w[None], (i,) + (0,) * w.ndim)
        else:
            stacked[i] = w
        del w
    return stacked


def set_block(out, block, start: tuple):
    """out[start:start + block.shape] = block on the device, in place (`out` is donated). An explicit
    dynamic_update_slice stays in place on every backend; `out.at[...].set` lowers to a scatter,
    which XLA:CPU runs into a fresh copy of the whole buffer."""
    global _SET_BLOCK
    if _SET_BLOCK is None:
        import jax

        _SET_BLOCK = jax.jit(lambda o, b, s: jax.lax.dynamic_update_slice(o, b.astype(o.dtype), s),
                             donate_argnums=0)
    return _SET_BLOCK(out, block, tuple(np.int32(x) for x in start))


_SET_BLOCK = None
