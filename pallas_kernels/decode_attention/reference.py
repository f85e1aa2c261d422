"""Pure-jnp decode attention over a dense KV cache: the reference for the Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def decode_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Single-query grouped-query attention against the first ``lengths[b]`` cache slots.

    Args:
      q: ``[B, N, H]``, one query per sequence and head.
      k_cache: ``[B, K, S, H]``; query head ``n`` reads kv head ``n // (N // K)``.
      v_cache: ``[B, K, S, H]``.
      lengths: ``[B]`` int32, valid keys per sequence (clipped to ``[0, S]``). Key ``j``
        is attended iff ``j < lengths[b]`` and, with a window,
        ``j >= lengths[b] - sliding_window``. Other slots may hold anything, NaN included
        (slots past the length are unwritten; slots before the window may be recycled).
      scale: multiplies the logits (usually ``H ** -0.5``).
      sliding_window: attend only to the last ``sliding_window`` valid keys.
      softcap: if set, ``logits = softcap * tanh(logits / softcap)`` before masking.

    Returns:
      ``[B, N, H]`` in ``q.dtype``; zeros for a sequence with no valid key.
    """
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, seq_len, _ = k_cache.shape
    group = num_heads // num_kv_heads
    qg = q.reshape(batch, num_kv_heads, group, head_dim)  # [B, K, G, H]
    logits = jnp.einsum("BKGH,BKSH->BKGS", qg, k_cache, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)

    lengths = jnp.clip(lengths, 0, seq_len)[:, None]  # [B, 1]
    pos = jnp.arange(seq_len, dtype=jnp.int32)[None, :]  # [1, S]
    valid = pos < lengths  # [B, S]
    if sliding_window is not None:
        valid &= pos >= lengths - sliding_window
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)  # [B, K, G, S]
    row_max = jnp.max(logits, axis=-1, keepdims=True)  # [B, K, G, 1]
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(logits - row_max)  # masked keys give exactly 0
    denom = jnp.sum(probs, axis=-1, keepdims=True)  # [B, K, G, 1]

    v = jnp.where(valid[:, None, :, None], v_cache, jnp.zeros_like(v_cache))  # [B, K, S, H]
    out = jnp.einsum("BKGS,BKSH->BKGH", probs, v, preferred_element_type=jnp.float32)
    out = out / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)
