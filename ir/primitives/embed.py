"""Token tables: `embed` (ids -> rows) and `lm_head` (rows -> logits)."""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jax.core import ShapedArray

from pallax.ir.primitives.base import F32, _define, _dot_rows, fence, widen


# --------------------------------------------------------------------------- embed
def embed_reference(ids, table, *, scale):
    """ids [B, T] int32, table [V, D] -> [B, T, D] in table dtype (times `scale`)."""
    if table.dtype in (jnp.bfloat16, jnp.float16):
        # Gather the 16-bit patterns: XLA:CPU runs a 16-bit float gather in float32,
        # converting the whole table, and hoists that convert out of the decode loop
        # (a float32 copy of the table kept in memory).
        bits = jnp.take(lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0, mode="clip")
        rows = lax.bitcast_convert_type(bits, table.dtype)  # [B, T, D]
    else:
        rows = jnp.take(table, ids, axis=0, mode="clip")  # [B, T, D]
    if scale is None:
        return rows
    return fence((widen(rows) * jnp.asarray(scale, F32)).astype(table.dtype))


def _embed_abstract(ids, table, *, scale):
    del scale
    return ShapedArray((*ids.shape, table.shape[1]), table.dtype)


embed_p = _define("embed", embed_reference, _embed_abstract)


def embed(ids, table, *, scale=None):
    return embed_p.bind(ids, table, scale=None if scale is None else float(scale))


# ------------------------------------------------------------------------- lm_head
def lm_head_reference(x, table, *, softcap):
    """x [..., D] against the (tied) table [V, D] -> float32 logits [..., V]."""
    logits = _dot_rows(x.astype(F32), widen(table), math.prod(x.shape[:-1]))
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


def _lm_head_abstract(x, table, *, softcap):
    del softcap
    if x.shape[-1] != table.shape[1]:
        raise TypeError(f"lm_head: x {x.shape} vs table {table.shape}")
    return ShapedArray((*x.shape[:-1], table.shape[0]), F32)


lm_head_p = _define("lm_head", lm_head_reference, _lm_head_abstract)


def lm_head(x, table, *, softcap=None):
    return lm_head_p.bind(x, table, softcap=None if softcap is None else float(softcap))
