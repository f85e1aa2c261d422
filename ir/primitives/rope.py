"""Rotary position embedding: `rope`."""

from __future__ import annotations

import jax.numpy as jnp
from jax.core import ShapedArray

from pallax.ir.primitives.base import F32, _define


# ---------------------------------------------------------------------------- rope
def rope_reference(x, positions, *, theta, scaling=1.0):
    """Rotary embedding, rotate-half layout. x [B, T, N, H], positions [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=F32) * 2.0 / x.shape[-1]))
    angles = (positions.astype(F32) / scaling)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(F32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _rope_abstract(x, positions, *, theta, scaling):
    del theta, scaling
    if positions.shape != x.shape[:2]:
        raise TypeError(f"rope: positions {positions.shape} vs x {x.shape}")
    return ShapedArray(x.shape, x.dtype)


rope_p = _define("rope", rope_reference, _rope_abstract)


def rope(x, positions, *, theta, scaling=1.0):
    return rope_p.bind(x, positions, theta=float(theta), scaling=float(scaling))
