"""Which cache slots a decode query attends to, shared by the TPU and GPU kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def key_range(length: jax.Array, sliding_window: int | None) -> tuple[jax.Array, jax.Array]:
    """Half-open key interval ``[lo, hi)`` for a sequence of ``length`` (already in [0, S])."""
    if sliding_window is None:
        return jnp.zeros_like(length), length
    return jnp.maximum(length - sliding_window, 0), length


def block_range(lo: jax.Array, hi: jax.Array, block_k: int) -> tuple[jax.Array, jax.Array]:
    """Half-open interval of key blocks ``[first, stop)`` that overlap keys ``[lo, hi)``.

    ``lo`` and ``hi`` are non-negative, so truncating ``lax.div`` is floor division
    (and, unlike ``//``, lowers on Mosaic TPU without a sign computation).
    """
    first = lax.div(lo, block_k)
    stop = jnp.maximum(lax.div(hi + block_k - 1, block_k), first)
    return first, stop
