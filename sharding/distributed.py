"""Multi-process runs: one jax process per host (or per group of devices), all of them
running the same program over one global mesh (jax's multi-controller model).

    pallax.sharding.initialize("10.0.0.1:1234", num_processes=2, process_id=0)

must run in every process before anything touches a jax device; afterwards
`jax.devices()` lists every process's devices, `shard:tensor=T:data=D` builds its mesh
over them, and every process calls the same `generate` with the same arguments.
On CPU the processes' collectives go over gloo (TCP).

`to_host` reads arrays back on every process: an array split over devices of other
processes is gathered first (a collective: every process must call it, in the same
order, which the runtime does because every process runs the same steps).
"""

from __future__ import annotations

import jax
import numpy as np


def _positive_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    return int(value)


def check_address(address) -> str:
    """HOST:PORT, or a clear error naming the value."""
    if not isinstance(address, str) or address.count(":") < 1:
        raise ValueError(f"coordinator address {address!r} must be HOST:PORT, e.g. 10.0.0.1:1234")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"coordinator address {address!r} must be HOST:PORT with a port in 1..65535"
        )
    return address


def check_args(coordinator_address, num_processes, process_id, local_cpu_devices=None):
    """`initialize`'s arguments checked, without side effects: (n, i, local devices)."""
    check_address(coordinator_address)
    n = _positive_int("num_processes", num_processes)
    i = _positive_int("process_id", process_id, low=0)
    if i >= n:
        raise ValueError(f"process_id={i} must be in [0, num_processes={n})")
    local = None
    if local_cpu_devices is not None:
        local = _positive_int("local_cpu_devices", local_cpu_devices)
    return n, i, local


def initialize(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    local_cpu_devices: int | None = None,
) -> None:
    """Join a multi-process run over `jax.distributed`. Process 0 serves the coordinator
    at `coordinator_address`; every process passes the same address and count and its
    own `process_id` in [0, num_processes). `local_cpu_devices` sets how many CPU
    devices this process has (jax's default is one)."""
    n, i, local = check_args(coordinator_address, num_processes, process_id, local_cpu_devices)
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "pallax.sharding.initialize must run before jax uses a device (before loading "
            "or compiling a model)"
        )
    if local is not None:
        jax.config.update("jax_num_cpu_devices", local)
    # CPU devices of different processes talk over gloo; other platforms bring their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, n, i)


def to_host(tree):
    """`jax.device_get`, for arrays this process holds only part of as well: those are
    gathered from every process first (every process must make the same call)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(x, tiled=True)
        return jax.device_get(x)

    return jax.tree.map(one, tree)
