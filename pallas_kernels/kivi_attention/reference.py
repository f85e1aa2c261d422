"""Pure-jnp KIVI decode attention: the reference for the Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallax.ir import kvquant


def kivi_decode_attention_reference(
    q: jax.Array,
    state: dict[str, jax.Array],
    lengths: jax.Array,
    *,
    bits: int,
    group_size: int,
    residual: int,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    full_first: int = 0,
) -> jax.Array:
    """One decode query per sequence over a KIVI cache, as ``kvquant.attend`` computes it.

    Args:
      q: ``[B, N, H]``; query head ``n`` reads kv head ``n // (N // K)``.
      state: one layer's KIVI cache, ``kvquant.PARTS`` (and ``FIRST_PARTS`` with
        ``full_first``) -> arrays, as ``kvquant.write`` leaves it.
      lengths: ``[B]`` int32, tokens written per sequence; the query is the token at
        position ``lengths - 1`` (already written). Positions below
        ``num_quantized(lengths)`` are read dequantized, the newer ones from the ring.
      bits, group_size, residual, full_first: the cache's ``KiviConfig``.
      scale: multiplies the logits.
      sliding_window: attend only to positions ``> lengths - 1 - sliding_window``.
      softcap: if set, ``logits = softcap * tanh(logits / softcap)`` before masking.

    Returns:
      ``[B, N, H]`` in ``q.dtype``, computed in float32; zeros for a sequence with no key.
    """
    cfg = kvquant.KiviConfig(
        bits, group_size, residual, jnp.dtype(state["k.scale"].dtype).name, full_first
    )
    out = kvquant.attend(
        q[:, None],  # [B, 1, N, H]
        state,
        lengths - 1,
        jnp.ones_like(lengths),
        cfg,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
    )
    return out[:, 0].astype(q.dtype)
