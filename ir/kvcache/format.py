"""What a KV storage format is: how one layer's keys and values are stored row by row.

A format owns the arrays that hold the tokens the slot policy keeps (the "rows") and,
optionally, a full-precision staging ring the newest tokens wait in until a whole
granule of them can be encoded (KIVI quantizes keys per channel over G tokens, so a
token cannot be encoded alone). The slot policy (ir/kvcache/policy.py) decides which
row a granule goes to; the format never sees positions.

A format is a frozen dataclass (hashable: it is a parameter of the `attention`
primitive) with:

- `granule`: tokens encoded together (1 for dense and int8, G for KIVI);
- `residual`: staging: with L tokens written, positions at or above
  `stored(L) = granule * floor(max(L - residual, 0) / granule)` wait in a ring of
  `staging = residual + granule` slots (position p in slot p % staging); 0: no ring;
- `full_first`: leading positions also kept in full precision (never encoded);
- `row_parts(kv, h, dtype, rows)`: the row arrays, name -> (shape, dtype), with the
  names of the parts indexed per granule rather than per token in `granule_parts`;
- `encode(k, v)`: float32 [..., n, H] (n a multiple of granule) -> the row parts;
- `decode(state)`: the row parts -> keys, values float32 [..., rows, H];
- `admit(x, dtype)`: a new token [..., H] as the cache first holds it, float32
  (what the call's own queries see).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Format:
    name = "format"
    granule_parts: ClassVar[frozenset] = frozenset()

    @property
    def granule(self) -> int:
        return 1

    @property
    def residual(self) -> int:
        return 0

    @property
    def full_first(self) -> int:
        return 0

    @property
    def staging(self) -> int:
        """Slots of the full-precision ring new tokens wait in (0: encoded at once)."""
        return 0

    def stored(self, length):
        """How many leading positions have left staging after `length` tokens."""
        if not self.staging:
            return jnp.asarray(length, jnp.int32)
        g = self.granule
        return g * (jnp.maximum(length - self.residual, 0) // g)

    def check(self, head_dim: int, prefix: str) -> None:
        """Raise ValueError when a layer's head dim does not fit the format."""

    def row_parts(self, kv: int, h: int, dtype, rows) -> dict[str, tuple]:
        raise NotImplementedError

    def encode(self, k, v) -> dict:
        raise NotImplementedError

    def decode(self, state: dict):
        raise NotImplementedError

    def admit(self, x, dtype):
        return x.astype(dtype).astype(F32)

    def __str__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}({fields})"


def ring_positions(length, ring: int):
    """The position each ring slot holds after `length` tokens: the newest p < length
    with p % ring == slot (negative when no such position was written). [..., ring]"""
    j = jnp.arange(ring, dtype=jnp.int32)
    last = jnp.asarray(length, jnp.int32)[..., None] - 1
    return last - jnp.mod(last - j, ring)


def rows_template(rows, granule: int):
    """The per-granule row count for a row count (an int, or the symbol "S")."""
    if isinstance(rows, str):
        return rows if granule == 1 else f"{rows}/{granule}"
    return rows // granule
