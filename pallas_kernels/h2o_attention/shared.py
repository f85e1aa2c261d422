"""What the TPU and GPU kernels share: which candidates a query sees, and its dots' dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def visible(kpos: jax.Array, qpos: jax.Array, sliding_window: int | None) -> jax.Array:
    """Candidates at ``kpos`` (-1: empty) that the query at ``qpos`` attends to: filled, not
    after the query, and with a window, within its last ``sliding_window`` positions."""
    ok = (kpos >= 0) & (kpos <= qpos)
    if sliding_window is not None:
        ok &= kpos > qpos - sliding_window
    return ok


def dot_dtype(q_dtype, k_dtype):
    """The operand dtype of ``q @ k.T``: the common dtype when ``q`` and the keys share
    one (a 16-bit product is exact in float32), else float32 (both are upcast)."""
    q_dtype, k_dtype = jnp.dtype(q_dtype), jnp.dtype(k_dtype)
    return q_dtype if q_dtype == k_dtype else jnp.dtype(jnp.float32)


def precision(dtype):
    """float32 dots at HIGHEST: the reference's float32 math, not a bfloat16 pass."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
