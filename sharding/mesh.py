"""The device mesh: axes ("data", "tensor"), data-parallel replicas of tensor-parallel
groups (a tensor group's devices are adjacent in the device list)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

AXES = ("data", "tensor")
DATA, TENSOR = AXES


def batch_spec(ndim: int, last=None, axis=None) -> PartitionSpec:
    """Batch over data; `last` (or dimension `axis`) over tensor."""
    spec = [DATA] + [None] * (ndim - 1)
    if last is not None:
        spec[-1] = last
    if axis is not None:
        spec[axis] = TENSOR
    return PartitionSpec(*spec)


def make_mesh(tensor: int, data: int, devices=None) -> Mesh:
    """A (data, tensor) mesh over `devices` (default: the first tensor * data of
    `jax.devices()`), or a clear error naming the bad value."""
    for name, value in (("tensor", tensor), ("data", data)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"shard: {name}={value!r} must be a positive integer")
    need = tensor * data
    if devices is None:
        available = jax.devices()
        if need > len(available):
            raise ValueError(
                f"shard: tensor={tensor} x data={data} needs {need} devices; "
                f"{len(available)} exist ({available[0].platform})"
            )
        devices = available[:need]
    devices = list(devices)
    if len(devices) != need:
        raise ValueError(
            f"shard: tensor={tensor} x data={data} needs {need} devices; {len(devices)} given"
        )
    if jax.process_count() > 1:  # every process runs every step: each needs a device in it
        missing = sorted(set(range(jax.process_count())) - {d.process_index for d in devices})
        if missing:
            raise ValueError(
                f"shard: tensor={tensor} x data={data} uses no device of processes {missing} "
                f"({jax.process_count()} processes, {len(jax.devices())} devices); a "
                "multi-process mesh spans every process"
            )
    return Mesh(np.array(devices, dtype=object).reshape(data, tensor), AXES)
