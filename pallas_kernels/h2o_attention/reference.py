"""Pure-jnp H2O decode attention with attention mass: the reference for the Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def h2o_decode_attention_reference(
    q: jax.Array,
    keys: jax.Array,
    vals: jax.Array,
    kpos: jax.Array,
    qpos: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One decode query per sequence over H2O's candidates, and the mass each received.

    Args:
      q: ``[B, N, H]``; query head ``n`` reads kv head ``n // (N // K)``.
      keys: ``[B, K, S, H]``, the candidates (H2O: the M cache slots and the new token).
      vals: ``[B, K, S, H]``.
      kpos: ``[B, K, S]`` int32, each candidate's position, -1 for an empty slot.
      qpos: ``[B]`` int32, the query's position. Candidate ``s`` is attended iff
        ``0 <= kpos <= qpos`` and, with a window, ``kpos > qpos - sliding_window``;
        the others may hold anything, NaN included.
      scale: multiplies the logits.
      sliding_window: attend only to the last ``sliding_window`` positions.
      softcap: if set, ``logits = softcap * tanh(logits / softcap)`` before masking.

    Returns:
      ``out`` ``[B, N, H]`` in ``q.dtype`` and ``mass`` ``[B, K, S]`` float32, the
      softmax probability each candidate received summed over the ``N / K`` query heads
      of its kv head; both computed in float32, zeros for a sequence with no visible key.
    """
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, _, _ = keys.shape
    group = num_heads // num_kv_heads
    qg = q.reshape(batch, num_kv_heads, group, head_dim)  # [B, K, G, H]
    logits = jnp.einsum("BKGH,BKSH->BKGS", qg, keys, preferred_element_type=F32) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)

    qp = qpos[:, None, None]  # [B, 1, 1]
    seen = (kpos >= 0) & (kpos <= qp)  # [B, K, S]
    if sliding_window is not None:
        seen &= kpos > qp - sliding_window
    logits = jnp.where(seen[:, :, None, :], logits, -jnp.inf)  # [B, K, G, S]
    row_max = jnp.max(logits, axis=-1, keepdims=True)  # [B, K, G, 1]
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(logits - row_max)  # unseen candidates give exactly 0
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)  # [B, K, G, S]

    v = jnp.where(seen[..., None], vals, jnp.zeros_like(vals))  # [B, K, S, H]
    out = jnp.einsum("BKGS,BKSH->BKGH", probs, v, preferred_element_type=F32)
    mass = jnp.sum(probs, axis=2)  # [B, K, S]
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype), mass
