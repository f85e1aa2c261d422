"""Pure-jnp decode attention over a paged KV cache: the reference for the Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallax.pallas_kernels.decode_attention.reference import decode_attention_reference


def gather_pages(pages: jax.Array, block_table: jax.Array) -> jax.Array:
    """``pages`` [P, K, page, ...] and ``block_table`` [B, n] -> [B, K, n * page, ...]: each
    sequence's pages in order (zeros where the table holds an id outside ``[0, P)``)."""
    g = jnp.take(pages, block_table, axis=0, mode="fill", fill_value=0)  # [B, n, K, page, ...]
    g = jnp.moveaxis(g, 1, 2)
    return g.reshape(g.shape[0], g.shape[1], g.shape[2] * g.shape[3], *g.shape[4:])


def paged_decode_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_table: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Single-query grouped-query attention over the first ``lengths[b]`` positions of
    each sequence, position ``p`` being row ``p % page`` of page ``block_table[b, p // page]``.

    Args:
      q: ``[B, N, H]``.
      k_pages, v_pages: ``[P, K, page, H]``, the pool.
      block_table: ``[B, n]`` int32 page ids; entries past a sequence's length may hold
        anything (they are never read).
      lengths: ``[B]`` int32, clipped to ``[0, n * page]``.
      scale, sliding_window, softcap: as ``decode_attention_reference``.

    Returns:
      ``[B, N, H]`` in ``q.dtype``.
    """
    return decode_attention_reference(
        q,
        gather_pages(k_pages, block_table),
        gather_pages(v_pages, block_table),
        lengths,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
    )
