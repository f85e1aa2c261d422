"""Pure-jnp RMSNorm, the numerical reference for the Pallas kernels (and the CPU path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def rms_norm_reference(x: jax.Array, w: jax.Array, *, eps: float) -> jax.Array:
    """RMSNorm over the last axis: ``x * rsqrt(mean(x**2) + eps) * w``, computed in float32.

    Args:
      x: ``[..., D]`` activations.
      w: ``[D]`` scale (models with a ``1 + w`` convention, like Gemma, pass ``1 + w``).
      eps: added to the mean square before the reciprocal square root.

    Returns:
      ``[..., D]`` in ``x.dtype``.
    """
    x32 = x.astype(jnp.float32)  # [..., D]
    mean_sq = jnp.mean(x32 * x32, axis=-1, keepdims=True)  # [..., 1]
    return (x32 * lax.rsqrt(mean_sq + eps) * w.astype(jnp.float32)).astype(x.dtype)
