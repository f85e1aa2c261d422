"""What a KV slot policy is: which stored rows hold which positions, and who sees them.

A policy decides where each granule leaving the format's staging goes (a row of the
format's arrays, or nowhere), which positions the rows hold, and which positions a
query may see beyond causality and the layer's own sliding window. It never sees how
rows are encoded. A policy is a frozen dataclass (a parameter of the `attention`
primitive) with:

- `rows(fmt)`: the row count, an int or the symbol "S" (the cache length);
- `parts(fmt, kv, rows)`: its own arrays, name -> (shape, dtype) (H2O's scores);
- `sinks`: leading positions that must stay in full precision (StreamingLLM);
- `row_positions(fmt, state, stored, kv, rows)`: the position each row holds [B, K, rows]
  (-1: empty) with `stored` [B] positions encoded ([B, 1, rows] when every head alike);
- `visible(kp, qp)`: the policy's own mask over key / query positions;
- `place(fmt, st, enc, starts, leaving, stored, end, scores)`: one sequence: the
  encoded granules starting at `starts` [L] (`leaving` [L]: they leave staging in
  this call) go to their rows; returns the new row and policy arrays;
- `by_position`, `key_window`: whether the batch-invariant attention may lay the
  candidates out by position (each position at most once; a query sees the sinks and
  at most `key_window` positions up to its own, None: every one);
- `needs_mass`: the attention returns each key's attention mass for `place` (H2O);
- `unbounded`: positions are assigned within the cache, so generation may run past
  the model's context length.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

DROP = 2**30  # a granule index past any cache: the scatter drops it


@dataclasses.dataclass(frozen=True)
class Policy:
    name = "policy"
    needs_mass = False
    unbounded = False
    # Whether each position has at most one candidate and a query sees a span of them
    # bounded by `key_window` (None: all below it): the batch-invariant attention then
    # lays the candidates out by position (ir/kvcache/blocked.py).
    by_position = False

    @property
    def key_window(self) -> int | None:
        return None

    @property
    def sinks(self) -> int:
        return 0

    def check(self, fmt) -> None:
        """Raise ValueError when the policy cannot run over `fmt`."""

    def rows(self, fmt):
        raise NotImplementedError

    def parts(self, fmt, kv: int, rows) -> dict[str, tuple]:
        return {}

    def row_positions(self, fmt, state: dict, stored, kv: int, rows: int):
        raise NotImplementedError

    def visible(self, kp, qp):
        return True

    def place(self, fmt, st, enc, starts, leaving, stored, end, scores):
        raise NotImplementedError

    def add_mass(self, st, mass_rows, mass_ring):
        return st

    def stage_scores(self, st, take_new, mass_new_at_slot):
        return st

    def __str__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}({fields})"


def scatter_granules(fmt, st: dict, enc: dict, dest) -> dict:
    """One sequence: write the encoded granules [K, L * G, ...] (per-granule parts
    [K, L, ...]) to granule rows `dest` [L] (DROP: not written)."""
    g = fmt.granule
    out = dict(st)
    for name, val in enc.items():
        arr = st[name]
        if name in fmt.granule_parts or g == 1:
            idx = dest
        else:
            rows = dest[:, None] * g + jnp.arange(g, dtype=jnp.int32)[None, :]
            idx = jnp.where(dest[:, None] == DROP, DROP, rows).reshape(-1)  # no int32 overflow
        out[name] = arr.at[:, idx].set(val.astype(arr.dtype), mode="drop")
    return out
