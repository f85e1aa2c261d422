"""Pure-jnp causal prefill attention over a dense KV cache or over candidate keys at
explicit positions: the reference for the kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallax.pallas_kernels.h2o_attention import shared


def visible(q_pos, k_pos, seq_len: int | None, sliding_window: int | None):
    """Whether the query at ``q_pos`` attends to the key at ``k_pos`` (broadcasting): the
    slot policy's rule (``h2o_attention.shared.visible``: a key >= 0, not after the query,
    within its window), and for a dense cache (``seq_len`` given) a slot of the cache."""
    ok = shared.visible(k_pos, q_pos, sliding_window)
    return ok if seq_len is None else ok & (k_pos < seq_len)


def flash_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    pos: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    kpos: jax.Array | None = None,
) -> jax.Array:
    """Causal grouped-query attention of a chunk of queries against the cache.

    Args:
      q: ``[B, T, N, H]``: query ``t`` of sequence ``b`` sits at position ``pos[b] + t``
        (a query offset: a later chunk of a chunked prefill attends the cache before it).
      k_cache: ``[B, K, S, H]``, slot ``j`` holding position ``j`` (the chunk's keys
        already written); query head ``n`` reads kv head ``n // (N // K)``.
      v_cache: ``[B, K, S, H]``.
      pos: ``[B]`` int32, the position of each sequence's first query.
      scale: multiplies the logits.
      sliding_window: a query at ``p`` sees keys ``(p - sliding_window, p]`` only.
      softcap: if set, ``logits = softcap * tanh(logits / softcap)`` before masking.
      kpos: candidates instead of slots: ``[B, K or 1, S]`` int32, the position of each
        key (-1: no key), in any order (a compressed cache's decoded rows, its staging
        and the chunk's own keys).

    Keys a query does not see may hold anything, NaN included. A query that sees no key
    (its position at or past ``S`` in a dense cache) gets zeros.

    Returns:
      ``[B, T, N, H]`` in ``q.dtype``.
    """
    batch, t, num_heads, head_dim = q.shape
    _, num_kv_heads, seq_len, _ = k_cache.shape
    group = num_heads // num_kv_heads
    qg = q.reshape(batch, t, num_kv_heads, group, head_dim)
    logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, k_cache, preferred_element_type=jnp.float32)
    logits = logits * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    q_pos = (pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :])[:, None, :, None]
    if kpos is None:  # [B, 1, T, S]
        ok = visible(q_pos, jnp.arange(seq_len, dtype=jnp.int32), seq_len, sliding_window)
    else:  # [B, K or 1, T, S]
        ok = visible(q_pos, kpos[:, :, None, :], None, sliding_window)
    logits = jnp.where(ok[:, :, None], logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(logits - row_max)  # masked keys give exactly 0
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    seen = ok.any(axis=2)  # [B, K or 1, S]: keys some query sees; NaN elsewhere must not leak
    v = jnp.where(seen[..., None], v_cache, jnp.zeros_like(v_cache))
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v.astype(jnp.float32),
                     preferred_element_type=jnp.float32)  # fmt: skip
    out = out / jnp.moveaxis(jnp.where(denom > 0, denom, 1.0), 3, 1)
    return out.reshape(batch, t, num_heads, head_dim).astype(q.dtype)
