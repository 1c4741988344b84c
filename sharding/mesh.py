"""The device mesh: axes ("data", "seq", "model") from a ParallelConfig.

    data   replicas, each with its own batch slice and KV pages
    seq    a long sequence's tokens (prefill) or KV pages (decode) split across devices
    model  tensor parallelism: attention heads, MLP columns, vocabulary

Users set the sizes the way vLLM users do: `LLM(model, tensor_parallel_size=4, data_parallel_size=2)`
or `--tensor-parallel-size 4`. Their product must equal the number of devices used.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "seq", "model")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Mesh sizes. Fields:

      data_parallel_size: replicas of the model (each with its own KV pages and batch slice).
      sequence_parallel_size: devices a long sequence's tokens / KV pages are split over.
      tensor_parallel_size: devices the heads, MLP columns and vocabulary are split over.
    """

    data_parallel_size: int = 1
    sequence_parallel_size: int = 1
    tensor_parallel_size: int = 1

    def __post_init__(self):
        for name in ("data_parallel_size", "sequence_parallel_size", "tensor_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data_parallel_size, self.sequence_parallel_size, self.tensor_parallel_size)

    @property
    def num_devices(self) -> int:
        return int(np.prod(self.shape))

    @property
    def is_single_device(self) -> bool:
        return self.num_devices == 1


def make_mesh(config: ParallelConfig, devices=None) -> Mesh:
    """A Mesh of shape (data, seq, model) over `devices` (default: all of jax.devices()).

    Raises:
      ValueError: if the sizes' product differs from the number of devices, saying which sizes
        would fit.
    """
    devices = list(jax.devices() if devices is None else devices)
    if config.num_devices != len(devices):
        raise ValueError(
            f"data_parallel_size x sequence_parallel_size x tensor_parallel_size = "
            f"{' x '.join(map(str, config.shape))} = {config.num_devices}, but {len(devices)} devices are "
            f"available: choose sizes whose product is {len(devices)} (e.g. tensor_parallel_size={len(devices)})")
    try:  # a topology-aware order (ICI rings on TPU) where jax can build one
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(config.shape, devices=devices)
    except Exception:  # CPU and odd shapes: plain order
        grid = np.asarray(devices, dtype=object).reshape(config.shape)
    return Mesh(grid, AXES)
