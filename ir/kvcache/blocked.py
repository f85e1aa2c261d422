"""`attend` in an order fixed by each query alone (batch invariance, the default): the
reference attention of every format x policy that no kernel serves.

`core.attend` is one einsum and one softmax over all the candidates: XLA:CPU picks their
algorithms (and so the summation order) by the whole shape, so a request's bits depended
on its batch-mates, and a prompt's on where its chunks started (a serving engine's
chunks are not `generate`'s). Here, as FlashAttention tiles it (and
`primitives.attention.tiled_attention` for the dense cache):

- the keys are visited in blocks of `TILE_K` with an online softmax; every dot and
  every sum has one shape whatever B, T and the cache are (`base.row_sum` for sums);
- the queries in tiles of `TILE_Q` (one query a tile when T = 1) aligned to absolute
  positions, so a query sits at the same row of its tile in every chunk;
- a policy whose queries see a bounded span of positions (`Policy.by_position`: full,
  sinks) lays the candidates out by position: blocks aligned to absolute positions, so
  each key is met in the same block, at the same offset, however the prompt was chunked
  and whether it came from the call's tokens or the cache's rows. A block no query of a
  tile can see leaves the running max, sum and output exactly as they were, so which
  blocks a call visits does not matter. The sinks (StreamingLLM) are a block of their
  own, met first, with the query rotated to its rank;
- any other policy (H2O, whose eviction depends on the chunks anyway) keeps the
  candidates' order, the same in every batch.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallax.ir.primitives import base
from pallax.ir.primitives.rope import rope_reference

F32 = jnp.float32
TILE_Q, TILE_K = 16, 128


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _scatter(x, kp, at, size):
    """Candidates x [B, K, S', ...] (kp [B, K, S'] their positions) to slots `at` of a
    [B, K, size, ...] buffer (`at` == size: dropped); empty slots hold zeros / -1."""
    b, kv = kp.shape[:2]
    rows, heads = jnp.arange(b)[:, None, None], jnp.arange(kv)[None, :, None]
    buf = jnp.zeros((b, kv, size, *x.shape[3:]), x.dtype)
    keys = buf.at[rows, heads, at].set(x, mode="drop")
    where = jnp.full((b, kv, size), -1, jnp.int32).at[rows, heads, at].set(kp, mode="drop")
    return keys, where


def layout(keys, vals, kpos, pos, t: int, rows: int, n_cand: int, policy, sliding_window):
    """(sink keys, values, positions [B, K, n] or None; the other keys, values, positions
    [B, K, L]): by position for `policy.by_position`, else the candidates' order. As in
    `core.attend`, the sinks met at their rank are those among the first `n_cand`
    candidates (the first rows, the call's tokens); a sink position still in a format's
    staging (KIVI) is met at its true distance."""
    b, kv, sp, _ = keys.shape
    kp = jnp.broadcast_to(kpos, (b, kv, sp))
    if not policy.by_position:
        return None, _pad(keys, vals, kp, _round_up(sp, TILE_K))
    n_sinks = policy.sinks
    sink = None
    ranked = (kp >= 0) & (kp < n_sinks) & (jnp.arange(sp) < n_cand)
    if n_sinks:
        at = jnp.where(ranked, kp, n_sinks)
        (sk, spos), (sv, _) = _scatter(keys, kp, at, n_sinks), _scatter(vals, kp, at, n_sinks)
        sink = (sk, sv, spos)
    windows = [w for w in (policy.key_window, sliding_window) if w is not None]
    if windows:  # queries at [pos, pos + t) see (pos - w, pos + t)
        w = min(windows)
        start = jnp.maximum(pos - w + 1, 0) // TILE_K * TILE_K  # [B]
        size = _round_up(t + w + TILE_K - 2, TILE_K)
    else:  # every position below the rows and the call's tokens
        start = jnp.zeros_like(pos)
        size = _round_up(rows + t, TILE_K)
    at = kp - start[:, None, None]
    at = jnp.where((kp >= 0) & ~ranked & (at >= 0) & (at < size), at, size)
    (mk, mpos), (mv, _) = _scatter(keys, kp, at, size), _scatter(vals, kp, at, size)
    return sink, (mk, mv, mpos)


def _pad(keys, vals, kp, size):
    pad = size - keys.shape[2]
    z = ((0, 0), (0, 0), (0, pad), (0, 0))
    return jnp.pad(keys, z), jnp.pad(vals, z), jnp.pad(kp, z[:3], constant_values=-1)


def attend(q, keys, vals, kpos, tpos, real, policy, *, rows, n_cand, rope, scale,
           sliding_window, softcap, mass: bool):  # fmt: skip
    """`core.attend`'s contract (q [B, T, N, H] at tpos [B, T] over the candidates keys /
    vals [B, K, S', H] at kpos; `rows` the format's row count, `n_cand` the candidates
    that may be sinks met at their rank), in a fixed order:
    (out [B, T, N, H] float32, each candidate's attention mass [B, K, S'] or None)."""
    b, t, n, h = q.shape
    kv, sp = keys.shape[1], keys.shape[2]
    g = n // kv
    tq = 1 if t == 1 else TILE_Q
    pos = tpos[:, 0]
    # queries at their absolute positions' rows: tile rows [start, start + tp)
    shift = pos % tq  # [B]
    tp = _round_up(t + tq - 1, tq) if tq > 1 else 1
    src = jnp.arange(tp, dtype=jnp.int32)[None, :] - shift[:, None]  # [B, Tp] -> query index
    live = (src >= 0) & (src < t)
    src_c = jnp.clip(src, 0, t - 1)
    take = lambda x: jnp.take_along_axis(x, src_c.reshape(b, tp, *[1] * (x.ndim - 2)), axis=1)  # noqa: E731
    q32 = jnp.where(live[:, :, None, None], take(q.astype(F32)), 0.0)
    qpos = pos[:, None] - shift[:, None] + jnp.arange(tp, dtype=jnp.int32)[None, :]  # [B, Tp]
    qreal = live & jnp.take_along_axis(real, src_c, axis=1)
    tb, r = tp // tq, tq * g

    def tiles(x):  # [B, Tp, N, H] -> [B, K, Tb, R, H], a tile's rows ordered (query, group)
        return x.reshape(b, tb, tq, kv, g, h).transpose(0, 3, 1, 2, 4, 5).reshape(b, kv, tb, r, h)

    qg = tiles(q32)
    q_at = jnp.repeat(qpos.reshape(b, 1, tb, tq), g, axis=-1)[..., None]  # [B, 1, Tb, R, 1]

    def logits_of(qx, kb, kp):  # kb [B, K, S_blk, H], kp [B, K, S_blk] -> masked logits
        s_blk = kb.shape[2]
        kb = jnp.broadcast_to(kb[:, :, None], (b, kv, tb, s_blk, h))
        lg = jnp.einsum("BKTRH,BKTSH->BKTRS", qx, kb, preferred_element_type=F32) * scale
        if softcap is not None:
            lg = softcap * jnp.tanh(lg / softcap)
        kq = kp[:, :, None, None, :]
        ok = (kq >= 0) & (kq <= q_at) & policy.visible(kq, q_at)
        if sliding_window is not None:
            ok &= kq > q_at - sliding_window
        return jnp.where(ok, lg, -jnp.inf)

    def step(carry, lg, vb):
        m, total, acc = carry
        m_new = jnp.maximum(m, jnp.max(lg, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row that saw no key yet
        corr = jnp.exp(m - m_safe)
        p = jnp.exp(lg - m_safe[..., None])
        total = total * corr + base.row_sum(p)
        s_blk = vb.shape[2]
        vb = jnp.broadcast_to(vb[:, :, None], (b, kv, tb, s_blk, h))
        pv = jnp.einsum("BKTRS,BKTSH->BKTRH", p, vb, preferred_element_type=F32)
        return m_new, total, acc * corr[..., None] + pv

    carry = (jnp.full((b, kv, tb, r), -jnp.inf, F32), jnp.zeros((b, kv, tb, r), F32),
             jnp.zeros((b, kv, tb, r, h), F32))  # fmt: skip
    sink, (mk, mv, mpos) = layout(keys, vals, kpos, pos, t, rows, n_cand, policy, sliding_window)
    if sink is not None:  # sink j meets the query at its rank: rotate it by that minus qp
        theta, scaling = rope
        qs = rope_reference(q32, jnp.minimum(qpos, policy.slots - 1) - qpos, theta=theta,
                            scaling=scaling)  # fmt: skip
        carry = step(carry, logits_of(tiles(qs), sink[0], sink[2]), sink[1])

    def block(j, carry):
        kb, vb, kp = (lax.dynamic_slice_in_dim(x, j * TILE_K, TILE_K, axis=2)
                      for x in (mk, mv, mpos))  # fmt: skip
        return step(carry, logits_of(qg, kb, kp), vb)

    m, total, acc = lax.fori_loop(0, mk.shape[2] // TILE_K, block, carry)
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]
    out = out.reshape(b, kv, tb, tq, g, h).transpose(0, 2, 3, 1, 4, 5).reshape(b, tp, n, h)
    back = jnp.clip(jnp.arange(t, dtype=jnp.int32)[None, :] + shift[:, None], 0, tp - 1)
    out = jnp.take_along_axis(out, back[:, :, None, None], axis=1)
    if not mass:
        return out, None
    if policy.by_position:
        raise NotImplementedError("attention mass over a by-position layout")
    # each candidate's mass over the real queries: a second pass with the final max and sum
    weight = jnp.repeat(qreal.reshape(b, 1, tb, tq), g, axis=-1).astype(F32)  # [B, 1, Tb, R]
    scale_rows = weight / jnp.where(total > 0, total, 1.0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)

    def mass_block(j, got):
        kb, kp = (lax.dynamic_slice_in_dim(x, j * TILE_K, TILE_K, axis=2) for x in (mk, mpos))
        p = jnp.exp(logits_of(qg, kb, kp) - m_safe[..., None]) * scale_rows[..., None]
        p = jnp.moveaxis(p, -1, 2).reshape(b, kv, TILE_K, tb * r)  # [B, K, S_blk, Tb * R]
        return lax.dynamic_update_slice_in_dim(got, base.row_sum(p), j * TILE_K, axis=2)

    got = lax.fori_loop(0, mk.shape[2] // TILE_K, mass_block, jnp.zeros(mpos.shape, F32))
    return out, got[:, :, :sp]
