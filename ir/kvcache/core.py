"""One layer's KV cache as a storage format x a slot policy: the reference attention.

Per layer the cache holds

- the format's row arrays, `policy.rows(fmt)` rows (ir/kvcache/format.py);
- the format's full-precision staging ring, `k.res` / `v.res` [B, K, C, H] (KIVI);
- the first `F = max(fmt.full_first, policy.sinks)` positions in full precision,
  `k.first` / `v.first` [B, K, F, H] (KIVI's first group, StreamingLLM's sinks);
- the policy's own arrays (H2O's positions and scores).

A call with T tokens at positions pos [B] (the first valid [B] of them real):

1. attends each query over the cache as it was before the call plus the call's own
   tokens as the format first holds them (`fmt.admit`), so a chunk attends exactly as
   token-by-token decode would, whatever the policy drops during the chunk;
2. encodes the granules that leave staging in the call (with no staging: the call's
   tokens) and hands them to the policy, which places them in rows (or drops them);
3. writes the new tokens to staging and positions below F to the first rows.

Every key is read at an explicit position (`row_positions` for rows, the ring's
positions for staging), so the visibility rules (causal, sliding window, the
policy's) are one mask for every combination.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallax.ir.kvcache import blocked
from pallax.ir.kvcache.format import F32, ring_positions
from pallax.ir.primitives import base
from pallax.ir.primitives.rope import rope_reference


def first_size(fmt, policy) -> int:
    return max(fmt.full_first, policy.sinks)


def layer_parts(fmt, policy, kv: int, h: int, dtype) -> dict[str, tuple]:
    """One layer's cache arrays: name -> (shape template over "B" / "S", dtype name)."""
    dtype = jnp.dtype(dtype).name
    rows = policy.rows(fmt)
    parts = dict(fmt.row_parts(kv, h, dtype, rows))
    if fmt.staging:
        parts["k.res"] = parts["v.res"] = (("B", kv, fmt.staging, h), dtype)
    n_first = first_size(fmt, policy)
    if n_first:
        parts["k.first"] = parts["v.first"] = (("B", kv, n_first, h), dtype)
    parts.update(policy.parts(fmt, kv, rows))
    return parts


def full_precision_dtype(state: dict, fallback):
    for name in ("k", "k.res", "k.first"):
        if name in state:
            return state[name].dtype
    return fallback


def candidates(k, v, state, pos, valid, fmt, policy):
    """Keys, values [B, K, S', H] float32 and positions kpos [B, K or 1, S'] (-1: not a key) of
    [first rows, the call's tokens, rows, staging]; the queries' positions [B, T]; which
    queries are real [B, T]; and the section sizes."""
    b, t, kv, _ = k.shape
    n_first = first_size(fmt, policy)
    dtype = full_precision_dtype(state, k.dtype)
    stored = fmt.stored(pos)  # [B]
    tpos = pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    real = jnp.arange(t)[None, :] < valid[:, None]
    rk, rv = fmt.decode(state)
    rows = rk.shape[2]
    rpos = policy.row_positions(fmt, state, stored, kv, rows)
    heads = rpos.shape[1]  # 1 when every KV head's rows hold the same positions: a cheaper mask
    bk = lambda x: jnp.broadcast_to(x[:, None], (b, heads, x.shape[-1]))  # noqa: E731
    keys, vals, kpos = [], [], []
    if n_first:  # positions that left staging; newer ones are read from the ring
        j = jnp.arange(n_first, dtype=jnp.int32)[None, :]
        keys.append(state["k.first"].astype(F32))
        vals.append(state["v.first"].astype(F32))
        kpos.append(bk(jnp.where(j < jnp.minimum(stored, n_first)[:, None], j, -1)))
    # the call's tokens as the cache will hold them: positions below F in the first rows'
    # full precision (a query later in the chunk sees what decode would), the rest as
    # the format admits them
    own = (tpos < n_first)[:, None, :, None]
    for out, x in ((keys, k), (vals, v)):
        x = jnp.swapaxes(x, 1, 2)
        held = fmt.admit(x, dtype)
        out.append(jnp.where(own, x.astype(dtype).astype(F32), held) if n_first else held)
    kpos.append(bk(jnp.where(real, tpos, -1)))
    keys.append(rk)
    vals.append(rv)
    kpos.append(jnp.where((rpos >= n_first) & (rpos < stored[:, None, None]), rpos, -1))
    sections = [n_first, t, rows]
    if fmt.staging:
        spos = ring_positions(pos, fmt.staging)
        keys.append(state["k.res"].astype(F32))
        vals.append(state["v.res"].astype(F32))
        kpos.append(bk(jnp.where(spos >= stored[:, None], spos, -1)))
        sections.append(fmt.staging)
    cat = lambda xs: jnp.concatenate(xs, axis=2)  # noqa: E731
    return cat(keys), cat(vals), cat(kpos), tpos, real, sections


def rotate_sink_keys(keys, kpos, qp, n: int, policy, rope):
    """One query a row at qp [B]: the sink keys among the first `n` candidates of keys
    [B, K, S', H] (at kpos [B, K or 1, S']) rotated back by qp - min(qp, slots - 1), the
    query's rank among the keys it sees. Rotating the keys instead of the query (as
    `attend` does) is the same logit: rotations compose."""
    if not policy.sinks:
        return keys
    back = qp - jnp.minimum(qp, policy.slots - 1)  # [B] >= 0
    head = jnp.swapaxes(keys[:, :, :n], 1, 2)  # [B, n, K, H]
    rotated = rope_reference(head, jnp.broadcast_to(back[:, None], head.shape[:2]),
                             theta=rope[0], scaling=rope[1])  # fmt: skip
    sink = (kpos[:, :, :n] >= 0) & (kpos[:, :, :n] < policy.sinks)
    head = jnp.where(sink[..., None], jnp.swapaxes(rotated, 1, 2), keys[:, :, :n])
    return jnp.concatenate([head, keys[:, :, n:]], axis=2)


def attend(q, keys, vals, kpos, tpos, real, policy, *, n_cand, rope, scale, sliding_window,
           softcap, mass: bool):  # fmt: skip
    """q [B, T, N, H] at tpos over keys / vals [B, K, S', H] at kpos [B, K, S'], of which
    only the first `n_cand` can be attention sinks. -> (out [B, T, N, H] float32, the
    attention mass each key received [B, K, S'] over the real queries, or None)."""
    b, t, n, h = q.shape
    kv = keys.shape[1]
    q32 = q.astype(F32)
    qg = q32.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, keys)
    kp, qp = kpos[:, :, None, None, :], tpos[:, None, None, :, None]  # [B,K,1,1,S'], [B,1,1,T,1]
    if policy.sinks:
        # Sink keys sit at their true positions j; the query meets them at its rank within
        # the cache, min(qp, slots - 1): rotate it on by that minus qp (rotations compose).
        theta, scaling = rope
        shift = jnp.minimum(tpos, policy.slots - 1) - tpos  # [B, T], <= 0
        q_s = rope_reference(q32, shift, theta=theta, scaling=scaling).reshape(qg.shape)
        ls = jnp.einsum("BTKGH,BKSH->BKGTS", q_s, keys[:, :, :n_cand])
        sink = kp[..., :n_cand] < policy.sinks
        head = jnp.where(sink, ls, logits[..., :n_cand])
        logits = jnp.concatenate([head, logits[..., n_cand:]], axis=-1)
    logits = logits * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    ok = (kp >= 0) & (kp <= qp) & policy.visible(kp, qp)
    if sliding_window is not None:
        ok &= kp > qp - sliding_window
    logits = jnp.where(ok, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    probs = jnp.exp(logits - m)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)  # [B, K, G, T, S']
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, vals).reshape(b, t, n, h)
    if not mass:
        return out, None
    return out, jnp.einsum("BKGTS,BT->BKS", probs, real.astype(F32))


def write(state, k, v, pos, valid, fmt, policy, mass=None, sections=None) -> dict:
    """Encode what leaves staging, place it by the policy, stage the new tokens and keep
    the first positions. k, v [B, T, K, H]; `mass` [B, K, S'] from `attend` (H2O)."""
    b, t = k.shape[:2]
    state = dict(state)
    m_new = None
    if mass is not None:
        n_first, _, rows = sections[:3]
        m_new = mass[:, :, n_first : n_first + t]  # [B, K, T]
        m_rows = mass[:, :, n_first + t : n_first + t + rows]
        m_ring = mass[:, :, n_first + t + rows :]
        state = policy.add_mass(state, m_rows, m_ring)
    zeros = jnp.zeros((b, k.shape[2], t), F32) if m_new is None else m_new
    state = leave(state, k, v, pos, valid, fmt, policy, zeros)
    return stage(state, k, v, pos, valid, fmt, policy, zeros)


def leave(state, k, v, pos, valid, fmt, policy, m_new) -> dict:
    """Encode the granules leaving staging and place them (m_new [B, K, T]: the new
    tokens' attention mass, for H2O)."""
    t = k.shape[1]

    def run(st):
        return jax.vmap(lambda *a: _leave(*a, fmt=fmt, policy=policy))(st, k, v, m_new, pos, valid)

    if fmt.staging and t == 1:  # decode: a granule leaves once every G steps
        return lax.cond(jnp.any(fmt.stored(pos + valid) > fmt.stored(pos)), run, lambda s: s, state)
    return run(state)


def stage(state, k, v, pos, valid, fmt, policy, m_new) -> dict:
    """Write the new tokens to staging and the positions below F to the first rows."""
    if not (fmt.staging or first_size(fmt, policy)):
        return state
    if k.shape[1] == 1 and "h2o.res.score" not in state:
        return _stage_token(state, k, v, pos, valid, fmt, policy)
    return jax.vmap(lambda *a: _stage(*a, fmt=fmt, policy=policy))(state, k, v, m_new, pos, valid)


def _leave(st, k, v, m_new, pos, valid, *, fmt, policy):
    """One sequence ([K, ...] arrays; k, v [T, K, H]; m_new [K, T])."""
    t, g, ring = k.shape[0], fmt.granule, fmt.staging
    end = pos + valid
    stored0, stored1 = fmt.stored(pos), fmt.stored(end)
    span = -(-(ring + t) // g) * g  # covers [stored0, end) whatever pos is
    p = stored0 + jnp.arange(span, dtype=jnp.int32)
    new_i = jnp.clip(p - pos, 0, t - 1)
    from_new = p >= pos

    def gather(res, new):  # -> [K, span, H] float32
        fresh = jnp.take(jnp.swapaxes(new, 0, 1), new_i, axis=1).astype(F32)
        if not ring:
            return fresh
        old = jnp.take(res, jnp.mod(p, ring), axis=1).astype(F32)
        return jnp.where(from_new[None, :, None], fresh, old)

    kspan = gather(st.get("k.res"), k)
    vspan = gather(st.get("v.res"), v)
    scores = jnp.take(m_new, new_i, axis=1)
    if "h2o.res.score" in st:
        old = jnp.take(st["h2o.res.score"], jnp.mod(p, ring), axis=1)
        scores = jnp.where(from_new[None], scores, old)
    starts = stored0 + jnp.arange(span // g, dtype=jnp.int32) * g
    leaving = (starts < stored1) & (starts + g > first_size(fmt, policy))
    enc = fmt.encode(kspan, vspan)
    return policy.place(fmt, st, enc, starts, leaving, stored1, end, scores)


def _stage_token(state, k, v, pos, valid, fmt, policy) -> dict:
    """`stage` for one token a row (decode), equal to it: a row update in place (ring slot
    pos % C; first row pos when pos < F) rather than a select over every slot."""
    live = valid > 0  # [B]
    out = dict(state)
    targets = []
    if fmt.staging:
        targets.append((("k.res", "v.res"), jnp.mod(pos, fmt.staging), live))
    n_first = first_size(fmt, policy)
    if n_first:
        targets.append(
            (("k.first", "v.first"), jnp.clip(pos, 0, n_first - 1), live & (pos < n_first))
        )
    for names, row, take in targets:
        for name, new in zip(names, (k, v), strict=True):
            out[name] = _put_rows(state[name], jnp.swapaxes(new, 1, 2), row, take)
    return out


def _put_rows(arr, x, row, take):
    """arr [B, K, C, H] with x [B, K, 1, H] at slot row[b] of each batch row where take[b].

    One scatter of whole rows, in place, on the bits (an unsigned integer of the width):
    XLA:CPU computes a bfloat16 scatter in float32, converting the whole array there and
    back, and a select over the array would read and write all of it."""
    bits = jnp.dtype(f"uint{8 * arr.dtype.itemsize}")
    a = lax.bitcast_convert_type(arr, bits)
    xi = lax.bitcast_convert_type(x.astype(arr.dtype), bits)
    get = jax.vmap(lambda a, j: lax.dynamic_slice(a, (0, j, 0), (a.shape[0], 1, a.shape[2])))
    xi = jnp.where(take[:, None, None, None], xi, get(a, row))  # kept rows: their old row
    a = jax.vmap(lambda a, x, j: lax.dynamic_update_slice(a, x, (0, j, 0)))(a, xi, row)
    return lax.bitcast_convert_type(a, arr.dtype)


def _stage(st, k, v, m_new, pos, valid, *, fmt, policy):
    """One sequence: ring slots whose newest position below `end` is a new token take
    it; positions below F go to the first rows."""
    t = k.shape[0]
    end = pos + valid
    out = dict(st)
    if fmt.staging:
        slot_pos = ring_positions(end, fmt.staging)  # [C]
        take_new = slot_pos >= pos
        slot_i = jnp.clip(slot_pos - pos, 0, t - 1)
        for name, new in (("k.res", k), ("v.res", v)):
            fresh = jnp.take(jnp.swapaxes(new, 0, 1), slot_i, axis=1).astype(st[name].dtype)
            out[name] = jnp.where(take_new[None, :, None], fresh, st[name])
        out = policy.stage_scores(out, take_new, jnp.take(m_new, slot_i, axis=1))
    n_first = first_size(fmt, policy)
    if n_first:
        j = jnp.arange(n_first, dtype=jnp.int32)
        take = ((j >= pos) & (j < end))[None, :, None]
        idx = jnp.clip(j - pos, 0, t - 1)
        for name, new in (("k.first", k), ("v.first", v)):
            fresh = jnp.take(jnp.swapaxes(new, 0, 1), idx, axis=1).astype(st[name].dtype)
            out[name] = jnp.where(take, fresh, st[name])
    return out


def reference(q, k, v, pos, valid, state: dict, fmt, policy, *, rope, scale, sliding_window,
              softcap):  # fmt: skip
    """Attend, then write: (out [B, T, N, H] in q's dtype, the new state)."""
    keys, vals, kpos, tpos, real, sections = candidates(k, v, state, pos, valid, fmt, policy)
    kw = dict(n_cand=sections[0] + sections[1], rope=rope, scale=scale,
              sliding_window=sliding_window, softcap=softcap, mass=policy.needs_mass)  # fmt: skip
    if base.BATCH_INVARIANT:
        out, mass = blocked.attend(q, keys, vals, kpos, tpos, real, policy, rows=sections[2], **kw)
    else:
        out, mass = attend(q, keys, vals, kpos, tpos, real, policy, **kw)
    new = write(state, k, v, pos, valid, fmt, policy, mass, sections)
    return out.astype(q.dtype), new


def part_names(fmt, policy) -> tuple[str, ...]:
    """The cache arrays of one layer, in the attention op's operand order."""
    return tuple(layer_parts(fmt, policy, 1, 64, "float32"))
