"""`attention`, the one attention op over a KV cache of any storage format and slot
policy (ir/kvcache/), and the dense x full fast paths."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.core import ShapedArray

from pallax.ir.kvcache import core
from pallax.ir.kvcache.dense import DENSE, Dense
from pallax.ir.kvcache.full import FULL, Full
from pallax.ir.primitives import base
from pallax.ir.primitives.base import F32, _define


# ----------------------------------------------------------------------- attention
def write_kv(cache, new, pos):
    """cache [B, K, S, H] <- new [B, T, K, H] at rows pos[b] .. pos[b] + T."""
    new = jnp.swapaxes(new, 1, 2).astype(cache.dtype)  # [B, K, T, H]
    return jax.vmap(lambda c, n, p: lax.dynamic_update_slice(c, n, (0, p, 0)))(cache, new, pos)


def attention_mask(pos, t, s, sliding_window):
    """[B, T, S] bool: query at pos[b] + t sees key j iff j <= it (and within the window)."""
    q_pos = pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    k_pos = jnp.arange(s, dtype=jnp.int32)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    return mask


def attention_core(q, k_cache, v_cache, pos, *, scale, sliding_window, softcap):
    """Grouped-query attention of q [B, T, N, H] over the cache [B, K, S, H]."""
    b, t, n, h = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    if t == 1:
        return _decode_attention_core(q, k_cache, v_cache, pos, scale, sliding_window, softcap)
    if base.BATCH_INVARIANT:
        return tiled_attention(q, k_cache, v_cache, pos, scale=scale,
                               sliding_window=sliding_window, softcap=softcap)  # fmt: skip
    qg = q.astype(F32).reshape(b, t, kv, n // kv, h) * scale
    logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, k_cache.astype(F32), preferred_element_type=F32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    mask = attention_mask(pos, t, s, sliding_window)  # [B, T, S]
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v_cache.astype(F32), preferred_element_type=F32)
    return out.reshape(b, t, n, h).astype(q.dtype)


# Tiles of the batch-invariant prefill attention: queries by TILE_Q, keys by TILE_K.
TILE_Q, TILE_K = 16, 128


def tiled_attention(q, k_cache, v_cache, pos, *, scale, sliding_window, softcap):
    """`attention_core` for T > 1 as FlashAttention tiles it: the keys in blocks of TILE_K
    at fixed cache positions, visited in order with an online softmax, and the queries in
    tiles of TILE_Q, so that every dot and every sum has one shape whatever B, T and S are.

    XLA:CPU picks a dot's algorithm (and so its summation order) by the dot's shape: the
    one-shot form gives a query different bits in a 16-token chunk than in a 128-token
    one, or over a longer cache. Here a query row's result depends on its own tokens,
    its position modulo TILE_Q and the cache up to it: key blocks past it are fully
    masked and leave the running max, sum and output exactly as they were. The loop
    stops at the last block any query of the call can see.
    """
    b, t, n, h = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    g = n // kv
    tp, sp = -(-t // TILE_Q) * TILE_Q, -(-s // TILE_K) * TILE_K
    tb, rows = tp // TILE_Q, TILE_Q * g
    qf = jnp.pad(q.astype(F32), ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    # [B, K, Tb, TILE_Q * G, H]: a tile's rows ordered (query, group)
    qg = qf.reshape(b, tb, TILE_Q, kv, g, h).transpose(0, 3, 1, 2, 4, 5).reshape(
        b, kv, tb, rows, h) * scale  # fmt: skip
    kc = jnp.pad(k_cache.astype(F32), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    vc = jnp.pad(v_cache.astype(F32), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    q_pos = pos[:, None] + jnp.arange(tp, dtype=jnp.int32)[None, :]  # [B, Tp]
    q_pos = jnp.repeat(q_pos.reshape(b, 1, tb, TILE_Q), g, axis=-1)[..., None]  # [B,1,Tb,R,1]
    offsets = jnp.arange(TILE_K, dtype=jnp.int32)

    def block(j, carry):
        m, total, acc = carry  # running max, sum [B, K, Tb, R]; output [B, K, Tb, R, H]
        kb, vb = (jnp.broadcast_to(lax.dynamic_slice_in_dim(c, j * TILE_K, TILE_K, axis=2)[
            :, :, None], (b, kv, tb, TILE_K, h)) for c in (kc, vc))  # fmt: skip
        logits = jnp.einsum("BKTRH,BKTSH->BKTRS", qg, kb, preferred_element_type=F32)
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        k_pos = j * TILE_K + offsets
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        logits = jnp.where(mask, logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row that saw no key yet
        corr = jnp.exp(m - m_safe)
        p = jnp.exp(logits - m_safe[..., None])
        total = total * corr + base.row_sum(p)
        pv = jnp.einsum("BKTRS,BKTSH->BKTRH", p, vb, preferred_element_type=F32)
        return m_new, total, acc * corr[..., None] + pv

    init = (jnp.full((b, kv, tb, rows), -jnp.inf, F32), jnp.zeros((b, kv, tb, rows), F32),
            jnp.zeros((b, kv, tb, rows, h), F32))  # fmt: skip
    last = jnp.max(pos) + tp  # keys past every query's position are never seen
    blocks = jnp.minimum((last + TILE_K - 1) // TILE_K, sp // TILE_K)
    _, total, acc = lax.fori_loop(0, blocks, block, init)
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]
    out = out.reshape(b, kv, tb, TILE_Q, g, h).transpose(0, 2, 3, 1, 4, 5).reshape(b, tp, n, h)
    return out[:, :t].astype(q.dtype)


def _decode_attention_core(q, k_cache, v_cache, pos, scale, sliding_window, softcap):
    """Single-token attention, laid out so XLA:CPU batches the dots over (B, K)."""
    b, _, n, h = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    qg = q.astype(F32).reshape(b, kv, n // kv, h) * scale  # [B, K, G, H]
    logits = jnp.einsum("BKGH,BKSH->BKGS", qg, k_cache.astype(F32), preferred_element_type=F32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    mask = attention_mask(pos, 1, s, sliding_window)[:, 0]  # [B, S]
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("BKGS,BKSH->BKGH", probs, v_cache.astype(F32), preferred_element_type=F32)
    return out.reshape(b, 1, n, h).astype(q.dtype)


def dense_attention(q, k, v, k_cache, v_cache, pos, *, scale, sliding_window, softcap):
    """Write k/v [B, T, K, H] into the caches at pos [B], then attend causally.

    Returns (out [B, T, N, H], k_cache, v_cache). Cache slots outside a query's
    causal (and sliding) window may hold any finite values: their logits are
    replaced with -inf by `where` and their values are weighted by zero.
    """
    if q.shape[1] == 1:
        out = decode_attention_split(
            q, k, v, k_cache, v_cache, pos, scale=scale, sliding_window=sliding_window,
            softcap=softcap,
        )  # fmt: skip
        return out, write_kv(k_cache, k, pos), write_kv(v_cache, v, pos)
    k_cache = write_kv(k_cache, k, pos)
    v_cache = write_kv(v_cache, v, pos)
    out = attention_core(
        q, k_cache, v_cache, pos, scale=scale, sliding_window=sliding_window, softcap=softcap
    )
    return out, k_cache, v_cache


def decode_attention_split(q, k, v, k_cache, v_cache, pos, *, scale, sliding_window, softcap):
    """Single-token attention of q [B, 1, N, H] at pos [B] over the cache *before* the
    write (slots < pos, within the window) plus the new k, v [B, 1, K, H] itself.

    Equal to writing k, v at pos and attending (`attention_core`), but the dots read
    the cache the decode loop carries rather than the written one. Attending over the
    written cache makes XLA:CPU fuse the write twice (once into the dot's operand) and
    copy every cache array to keep the loop's in place: 4 copies of each cache array a
    step; this way, 2 (SmolLM2 at batch 1, context 256: 84 -> 91 tok/s). The CPU kernel
    (cpu_kernels/attention.cc) writes in place and copies nothing.
    """
    b, _, n, h = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    qg = q.astype(F32).reshape(b, kv, n // kv, h) * scale  # [B, K, G, H]
    k_new = k[:, 0].astype(k_cache.dtype).astype(F32)  # [B, K, H], as the cache holds it
    v_new = v[:, 0].astype(v_cache.dtype).astype(F32)
    logits = jnp.einsum("BKGH,BKSH->BKGS", qg, k_cache.astype(F32), preferred_element_type=F32)
    own = jnp.einsum("BKGH,BKH->BKG", qg, k_new, preferred_element_type=F32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
        own = softcap * jnp.tanh(own / softcap)
    k_pos = jnp.arange(s, dtype=jnp.int32)[None, :]
    mask = k_pos < pos[:, None]  # [B, S]: the earlier tokens; slot pos is stale
    if sliding_window is not None:
        mask &= k_pos > pos[:, None] - sliding_window
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    top = jnp.maximum(jnp.max(logits, axis=-1), own)  # [B, K, G]; own is finite
    probs = jnp.exp(logits - top[..., None])
    p_own = jnp.exp(own - top)
    denom = jnp.sum(probs, axis=-1) + p_own
    out = jnp.einsum("BKGS,BKSH->BKGH", probs, v_cache.astype(F32), preferred_element_type=F32)
    out = (out + p_own[..., None] * v_new[:, :, None, :]) / denom[..., None]
    return out.reshape(b, 1, n, h).astype(q.dtype)


def attention_reference(q, k, v, pos, valid, *cache, format, policy, rope, scale,
                        sliding_window, softcap):  # fmt: skip
    """Attend q [B, T, N, H] over one layer's cache (`format` x `policy`, see
    ir/kvcache/core.py) plus the call's own k, v [B, T, K, H] at pos [B] (the first
    valid [B] tokens real), and write them: (out [B, T, N, H], *the new cache arrays).

    The dense x full cache writes all T tokens and attends causally (dense_attention):
    its rows past pos + valid are never read before they are written again."""
    if isinstance(format, Dense) and isinstance(policy, Full):
        return dense_attention(q, k, v, *cache, pos, scale=scale, sliding_window=sliding_window,
                               softcap=softcap)  # fmt: skip
    names = core.part_names(format, policy)
    out, new = core.reference(
        q, k, v, pos, valid, dict(zip(names, cache, strict=True)), format, policy, rope=rope,
        scale=scale, sliding_window=sliding_window, softcap=softcap,
    )  # fmt: skip
    return (out, *(new[n] for n in names))


def _attention_abstract(q, k, v, pos, valid, *cache, format, policy, **_):
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h:
        raise TypeError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} disagree")
    kv = k.shape[2]
    if n % kv:
        raise TypeError(f"attention: {n=} query heads not divisible by {kv=} kv heads")
    if pos.shape != (b,) or valid.shape != (b,):
        raise TypeError(f"attention: pos {pos.shape} / valid {valid.shape} must be [{b}]")
    parts = core.layer_parts(format, policy, kv, h, k.dtype)
    if len(cache) != len(parts):
        raise TypeError(
            f"attention: {len(cache)} cache arrays; {format} x {policy} has {len(parts)}"
        )
    for (name, (shape, _)), arr in zip(parts.items(), cache, strict=True):
        fixed = [(i, d) for i, d in enumerate(shape) if isinstance(d, int)]
        bad_rank = len(arr.shape) != len(shape) or arr.shape[0] != b
        if bad_rank or any(arr.shape[i] != d for i, d in fixed):
            raise TypeError(f"attention: cache {name} {arr.shape} does not match {shape} (B={b})")
    return (ShapedArray(q.shape, q.dtype), *(ShapedArray(a.shape, a.dtype) for a in cache))


attention_p = _define("attention", attention_reference, _attention_abstract, multiple_results=True)


def attention(q, k, v, k_cache, v_cache, pos, *, scale=None, sliding_window=None, softcap=None):
    """A model's attention over its dense cache: (out, k_cache, v_cache). KV passes turn
    it into other formats and policies (passes/compress_kv.py, passes/evict_kv.py)."""
    b, t = q.shape[:2]
    return tuple(attention_p.bind(
        q, k, v, pos, jnp.full((b,), t, jnp.int32), k_cache, v_cache, **attention_params(
            q, DENSE, FULL, None, scale, sliding_window, softcap),
    ))  # fmt: skip


def attention_params(q, format, policy, rope, scale, sliding_window, softcap) -> dict:
    return dict(
        format=format,
        policy=policy,
        rope=None if rope is None else (float(rope[0]), float(rope[1])),
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
        sliding_window=None if sliding_window is None else int(sliding_window),
        softcap=None if softcap is None else float(softcap),
    )
