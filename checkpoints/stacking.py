"""Filling the model's stacked [L, ...] parameters one source tensor at a time (GGUF and HF readers)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def stack_layers(read_layer: Callable[[int], np.ndarray], num_layers: int, dtype, *, to_device: bool = False,
                 sharding=None):
    """[L, ...] array of `read_layer(0..L-1)`, allocated once from the first layer's shape.

    On the host it is a numpy array; with `to_device` a jax array filled in place, so the host
    holds one layer's tensor at a time: on the default device, or laid out by `sharding` (a
    jax.sharding.Sharding of the full [L, ...] array), each device receiving only its shard."""
    stacked = None
    for i in range(num_layers):
        w = read_layer(i)
        if stacked is None:  # preallocate [L, ...] rather than stacking copies
            if to_device:
                stacked = device_zeros((num_layers, *w.shape), dtype, sharding)
            else:
                stacked = np.empty((num_layers, *w.shape), dtype=dtype)
        if to_device:
            stacked = set_block(stacked, w[None], (i,) + (0,) * w.ndim)
        else:
            stacked[i] = w
        del w
    return stacked


def stack_per_layer(per_layer: dict, read: Callable[[int, str, tuple], np.ndarray], num_layers: int, dtype, *,
                    progress=None, to_device: bool = False, shardings: dict | None = None) -> dict:
    """{"layers.<name>": stacked [L, ...]} for a reader's table name -> (source suffix, source shape,
    convert to jaxinfer's layout); `read(i, suffix, shape)` returns layer i's source tensor. Each
    tensor read ticks `progress` (a tqdm bar); `shardings` maps keys to the stacked arrays' layout."""
    out = {}
    for name, (suffix, shape, convert) in per_layer.items():
        def read_layer(i, suffix=suffix, shape=shape, convert=convert):
            w = convert(read(i, suffix, shape))
            if progress is not None:
                progress.update()
            return w

        key = f"layers.{name}"
        out[key] = stack_layers(read_layer, num_layers, dtype, to_device=to_device, sharding=(shardings or {}).get(key))
    return out


def device_zeros(shape: tuple, dtype, sharding=None):
    """A zero array on the default device, or created in place with `sharding` (no full copy on
    any one device)."""
    import jax
    import jax.numpy as jnp

    if sharding is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def set_block(out, block, start: tuple):
    """out[start:start + block.shape] = block on the device, in place (`out` is donated), keeping
    out's sharding. An explicit dynamic_update_slice stays in place on every backend;
    `out.at[...].set` lowers to a scatter, which XLA:CPU runs into a fresh copy of the whole buffer.
    It waits for the write: with async dispatch a loader's loop would queue host blocks faster than
    they are written, each held until its write runs (a 2 GB checkpoint's peak host memory rose
    past 2x its largest tensor on a loaded machine)."""
    fn = _SET_BLOCK.get(out.sharding)
    if fn is None:
        import jax

        fn = _SET_BLOCK[out.sharding] = jax.jit(
            lambda o, b, s: jax.lax.dynamic_update_slice(o, b.astype(o.dtype), s), donate_argnums=0,
            out_shardings=out.sharding)
    return fn(out, block, tuple(np.int32(x) for x in start)).block_until_ready()


_SET_BLOCK: dict = {}  # one jit per output sharding
