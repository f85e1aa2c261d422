"""Which cache positions a KIVI decode query attends to, shared by the TPU and GPU kernels.

With ``L`` tokens written the query is position ``L - 1`` and attends to every
stored position ``p >= lo`` (``lo = max(L - window, 0)``, 0 without a window).
With ``nq = num_quantized(L)`` and ``F = full_first``, position ``p`` is stored

- in the packed arrays when ``F <= p < nq`` (and ``p < S``),
- in the ``first`` arrays when ``p < min(nq, F)``,
- in ring slot ``p % C`` when ``p >= nq`` (the ring holds the newest ``C`` positions).

Lengths are non-negative here (the wrappers clip them), so truncating ``lax.div`` and
``lax.rem`` are floor division and modulo, and lower to the TPU scalar core and Triton.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# A layer's KIVI cache arrays in the kernels' operand order (ir/kvcache/kivi.py names them).
PARTS = ("k.data", "k.scale", "k.zero", "k.res", "v.data", "v.scale", "v.zero", "v.res")
FIRST_PARTS = ("k.first", "v.first")  # with full_first > 0


def bounds(
    length: jax.Array,
    *,
    group_size: int,
    residual: int,
    sliding_window: int | None,
    full_first: int,
    seq_len: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Scalars ``(lo, nq, packed_lo, packed_hi)``: attended positions are ``>= lo``;
    the attended packed rows are ``[packed_lo, packed_hi)`` (possibly empty)."""
    nq = group_size * lax.div(jnp.maximum(length - residual, 0), group_size)
    lo = jnp.zeros_like(length)
    if sliding_window is not None:
        lo = jnp.maximum(length - sliding_window, 0)
    return lo, nq, jnp.maximum(lo, full_first), jnp.minimum(nq, seq_len)


def block_range(lo: jax.Array, hi: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Half-open range of blocks ``[first, stop)`` overlapping rows ``[lo, hi)``."""
    first = lax.div(lo, block)
    stop = lax.div(hi + block - 1, block)
    return first, jnp.where(hi > lo, stop, first)


def ring_positions(slots: jax.Array, length: jax.Array, ring: int) -> jax.Array:
    """The position each ring slot holds after ``length`` tokens (negative if none):
    ``ir.kvcache.ring_positions`` without a vector modulo."""
    last = length - 1
    newest = lax.rem(last + ring, ring)  # the slot of position L - 1
    return last - newest + slots - jnp.where(slots > newest, ring, 0)


def ring_attended(positions: jax.Array, lo: jax.Array, nq: jax.Array) -> jax.Array:
    """Ring slots that take part: their position is not yet quantized, and in the window."""
    return positions >= jnp.maximum(lo, nq)


def first_attended(positions: jax.Array, lo: jax.Array, nq: jax.Array, full_first: int):
    """``first`` rows that take part: their position left the ring, and is in the window."""
    return (positions >= lo) & (positions < jnp.minimum(nq, full_first))
