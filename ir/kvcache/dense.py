"""The dense KV format: keys and values in the cache dtype, one row per token."""

from __future__ import annotations

import dataclasses

from pallax.ir.kvcache.format import F32, Format


@dataclasses.dataclass(frozen=True)
class Dense(Format):
    name = "dense"

    def row_parts(self, kv, h, dtype, rows):
        return {"k": (("B", kv, rows, h), dtype), "v": (("B", kv, rows, h), dtype)}

    def encode(self, k, v):
        return {"k": k, "v": v}  # cast to the cache dtype when stored

    def decode(self, state):
        return state["k"].astype(F32), state["v"].astype(F32)

    def __str__(self) -> str:
        return "dense"


DENSE = Dense()
