"""StreamingLLM's attention sinks (Xiao et al., "Efficient Streaming Language Models
with Attention Sinks"): the first `sinks` positions and a rolling window of the newest
`window`, in a fixed-size cache.

The sinks stay in the full-precision first rows (ir/kvcache/core.py); the window is a
ring of `ceil(window / G) * G` rows (G the format's granule): granule start p goes to
granule row (p / G) % (rows / G), so the ring holds at least the `window` positions
before the format's staging. Keys are cached rotated at their true positions:

- a window key p and a query at qp meet at their true distance qp - p (< window), as
  in the model;
- a sink key j meets the query at their positions within the cache, j and
  min(qp, sinks + window - 1) (the query's rank among the keys it sees): the core
  rotates the query on by min(qp, N - 1) - qp for the sink logits.

A query at qp sees the sinks and the keys in (qp - window, qp].
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallax.ir.kvcache.format import ring_positions
from pallax.ir.kvcache.policy import DROP, Policy, scatter_granules


@dataclasses.dataclass(frozen=True)
class Sinks(Policy):
    n_sinks: int = 4
    window: int = 252
    name = "sinks"
    unbounded = True
    by_position = True

    @property
    def key_window(self) -> int:
        return self.window

    @property
    def sinks(self) -> int:
        return self.n_sinks

    @property
    def slots(self) -> int:
        """The keys a query can see: its rank among them caps at slots - 1."""
        return self.n_sinks + self.window

    def rows(self, fmt):
        return -(-self.window // fmt.granule) * fmt.granule

    def row_positions(self, fmt, state, stored, kv, rows):
        pos = ring_positions(stored, rows)  # [B, rows]: newest p < stored, p = row (mod rows)
        return jnp.where(pos >= 0, pos, -1)[:, None]  # [B, 1, rows]: every head alike

    def visible(self, kp, qp):
        return (kp < self.n_sinks) | (kp > qp - self.window)

    def place(self, fmt, st, enc, starts, leaving, stored, end, scores):
        del end, scores
        g = fmt.granule
        rows = self.rows(fmt)
        newest = leaving & (starts >= stored - rows)  # older ones would be overwritten
        dest = jnp.where(newest, jnp.mod(starts // g, rows // g), DROP)
        return scatter_granules(fmt, st, enc, dest)

    def __str__(self) -> str:
        return f"sinks(sinks={self.n_sinks}, window={self.window})"
