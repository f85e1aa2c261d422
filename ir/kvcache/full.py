"""The full slot policy: every position keeps its own row (row p holds position p)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallax.ir.kvcache.policy import DROP, Policy, scatter_granules


@dataclasses.dataclass(frozen=True)
class Full(Policy):
    name = "full"
    by_position = True

    def rows(self, fmt):
        return "S"

    def row_positions(self, fmt, state, stored, kv, rows):
        b = stored.shape[0]
        r = jnp.arange(rows, dtype=jnp.int32)[None, None, :]
        return jnp.broadcast_to(jnp.where(r < stored[:, None, None], r, -1), (b, 1, rows))

    def place(self, fmt, st, enc, starts, leaving, stored, end, scores):
        del stored, end, scores
        dest = jnp.where(leaving, starts // fmt.granule, DROP)
        return scatter_granules(fmt, st, enc, dest)

    def __str__(self) -> str:
        return "full"


FULL = Full()
