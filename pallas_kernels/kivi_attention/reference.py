"""Pure-jnp KIVI decode attention: the reference for the Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallax.ir.kvcache import Kivi, ring_positions

F32 = jnp.float32


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
    """One decode query per sequence over a KIVI cache.

    Args:
      q: ``[B, N, H]``; query head ``n`` reads kv head ``n // (N // K)``.
      state: one layer's KIVI cache (``bounds.PARTS``, and ``FIRST_PARTS`` with
        ``full_first``) -> arrays.
      lengths: ``[B]`` int32, tokens written per sequence; the query is the token at
        position ``lengths - 1`` (already in the ring). Positions ``full_first <= p <
        num_quantized(lengths)`` are read dequantized from the packed rows, the first
        ones below that from the ``first`` rows, the newer ones from the ring.
      bits, group_size, residual, full_first: the cache's KIVI format.
      scale: multiplies the logits.
      sliding_window: attend only to positions ``> lengths - 1 - sliding_window``.
      softcap: if set, ``logits = softcap * tanh(logits / softcap)`` before masking.

    Returns:
      ``[B, N, H]`` in ``q.dtype``, computed in float32; zeros for a sequence with no key.
    """
    b, n, h = q.shape
    fmt = Kivi(bits, group_size, residual, jnp.dtype(state["k.scale"].dtype).name, full_first)
    kv, s = state["k.data"].shape[1:3]
    nq = fmt.stored(lengths)[:, None]  # [B, 1]
    keys, vals = fmt.decode(state)
    rows = jnp.arange(s, dtype=jnp.int32)[None, :]
    kpos = [jnp.where((rows >= full_first) & (rows < nq), rows, -1)]
    keys, vals = [keys], [vals]
    ring = ring_positions(lengths, state["k.res"].shape[2])
    kpos.append(jnp.where(ring >= nq, ring, -1))
    keys.append(state["k.res"].astype(F32))
    vals.append(state["v.res"].astype(F32))
    if full_first:
        j = jnp.arange(full_first, dtype=jnp.int32)[None, :]
        kpos.append(jnp.where(j < nq, j, -1))
        keys.append(state["k.first"].astype(F32))
        vals.append(state["v.first"].astype(F32))
    kpos = jnp.concatenate([jnp.broadcast_to(p, (b, p.shape[1])) for p in kpos], axis=1)
    keys, vals = jnp.concatenate(keys, axis=2), jnp.concatenate(vals, axis=2)
    ok = kpos >= 0
    if sliding_window is not None:
        ok &= kpos > lengths[:, None] - 1 - sliding_window
    qg = q.astype(F32).reshape(b, kv, n // kv, h)
    logits = jnp.einsum("BKGH,BKSH->BKGS", qg, keys) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(ok[:, None, None], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    probs = jnp.exp(logits - m)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("BKGS,BKSH->BKGH", probs, vals)
    return out.reshape(b, n, h).astype(q.dtype)
