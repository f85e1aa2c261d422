"""H2O, heavy-hitter eviction (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models"): a fixed budget of M cache slots per
layer, KV head and sequence, holding the tokens with the largest accumulated attention
plus the `recent` newest ones.

Per layer the cache holds k, v [B, K, M, H] (rotated at their true positions, as the
model rotates them), the position in each slot plus one [B, K, M] int32 (0: empty, so
a zero-filled cache starts empty) and its
accumulated attention mass [B, K, M] (float32). A call with T tokens:

1. the candidates are the M slots and the T new tokens;
2. the queries attend over the candidates (causally), and the attention op returns
   the attention mass each candidate received, summed over the call's queries and
   the query heads that share the KV head;
3. each candidate's score is its old score plus that mass (a new token starts at its
   mass); the `recent` newest positions are always kept, the other slots go to the
   highest scores.

Within a chunk the eviction happens once, after the chunk (the paper scores a prompt
with full attention, then keeps its heavy hitters); token by token it happens every step.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.core import ShapedArray

from pallax.ir import primitives

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class H2OConfig:
    budget: int
    recent: int


def attend_with_mass(q, keys, vals, kpos, qpos, *, scale, sliding_window, softcap, weights=None):
    """q [B, T, N, H] at qpos [B, T] over keys/vals [B, K, S, H] at kpos [B, K, S] (-1:
    empty). -> (out [B, T, N, H] float32, mass [B, K, S] float32: the attention each key
    received, summed over the queries whose `weights` [B, T] is 1 and the query heads
    of its KV head)."""
    b, t, n, h = q.shape
    kv = keys.shape[1]
    qg = q.astype(F32).reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, keys.astype(F32)) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    kp, qp = kpos[:, :, None, None, :], qpos[:, None, None, :, None]  # [B,K,1,1,S], [B,1,1,T,1]
    ok = (kp >= 0) & (kp <= qp)
    if sliding_window is not None:
        ok &= kp > qp - sliding_window
    logits = jnp.where(ok, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    probs = jnp.exp(logits - m)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)  # [B, K, G, T, S]
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, vals.astype(F32)).reshape(b, t, n, h)
    w = jnp.ones((b, t), F32) if weights is None else weights.astype(F32)
    mass = jnp.einsum("BKGTS,BT->BKS", probs, w)
    return out, mass


def candidates(k, v, state: dict, pos, valid):
    """The M cache slots followed by the T new tokens k, v [B, T, K, H]: (keys, vals
    [B, K, M + T, H] in the cache dtype, kpos [B, K, M + T] (-1: empty or padding), the
    queries' positions tpos [B, T] and which of them are real [B, T])."""
    b, t, kv, _ = k.shape
    tpos = pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    real = jnp.arange(t)[None, :] < valid[:, None]  # [B, T]
    new_pos = jnp.where(real, tpos, -1)
    old_pos = state["pos"] - 1  # stored + 1, so that a zero-filled cache is empty
    kpos = jnp.concatenate([old_pos, jnp.broadcast_to(new_pos[:, None], (b, kv, t))], -1)
    keys = jnp.concatenate([state["k"], jnp.swapaxes(k, 1, 2).astype(state["k"].dtype)], 2)
    vals = jnp.concatenate([state["v"], jnp.swapaxes(v, 1, 2).astype(state["v"].dtype)], 2)
    return keys, vals, kpos, tpos, real


def evict(state: dict, keys, vals, kpos, mass, length, cfg: H2OConfig) -> dict:
    """Add the candidates' attention `mass` [B, K, M + T] to their scores, then keep the
    `recent` newest positions below `length` [B] and the highest scores: the new state."""
    b, kv, s = kpos.shape
    t = s - state["score"].shape[-1]
    score = jnp.concatenate([state["score"], jnp.zeros((b, kv, t), F32)], -1) + mass
    recent = kpos >= length[:, None, None] - cfg.recent
    rank = jnp.where(kpos < 0, -jnp.inf, jnp.where(recent, jnp.inf, score))
    _, keep = lax.top_k(rank, cfg.budget)  # [B, K, M]
    take = lambda a: jnp.take_along_axis(a, keep, axis=-1)  # noqa: E731
    take4 = lambda a: jnp.take_along_axis(a, keep[..., None], axis=2)  # noqa: E731
    kept_pos = take(kpos)
    return {
        "k": take4(keys),
        "v": take4(vals),
        "pos": kept_pos + 1,
        "score": jnp.where(kept_pos >= 0, take(score), 0.0),
    }


def step(q, k, v, state: dict, pos, valid, cfg: H2OConfig, *, scale, sliding_window, softcap):
    """Attend and evict: (out [B, T, N, H] float32, new state)."""
    keys, vals, kpos, tpos, real = candidates(k, v, state, pos, valid)
    out, mass = attend_with_mass(
        q, keys, vals, kpos, tpos, scale=scale, sliding_window=sliding_window, softcap=softcap,
        weights=real,
    )  # fmt: skip
    return out, evict(state, keys, vals, kpos, mass, pos + valid, cfg)


PARTS = ("k", "v", "pos", "score")


def h2o_attention_reference(
    q, k, v, pos, valid, k_cache, v_cache, slot_pos, slot_score, *, budget, recent, scale,
    sliding_window, softcap,
):  # fmt: skip
    """(out [B, T, N, H] in q's dtype, k_cache, v_cache, slot_pos, slot_score)."""
    state = {"k": k_cache, "v": v_cache, "pos": slot_pos, "score": slot_score}
    out, new = step(q, k, v, state, pos, valid, H2OConfig(budget, recent), scale=scale,
                    sliding_window=sliding_window, softcap=softcap)  # fmt: skip
    return (out.astype(q.dtype), new["k"], new["v"], new["pos"], new["score"])


def _h2o_abstract(q, k, v, pos, valid, k_cache, v_cache, slot_pos, slot_score, *, budget, **_):
    b, t, n, h = q.shape
    kv = k.shape[2]
    want = (b, kv, budget, h)
    if k.shape != v.shape or k.shape[:2] != (b, t) or n % kv:
        raise TypeError(f"h2o_attention: q {q.shape}, k {k.shape}, v {v.shape} disagree")
    if k_cache.shape != want or v_cache.shape != want or slot_pos.shape != want[:3]:
        raise TypeError(f"h2o_attention: cache {k_cache.shape} / {slot_pos.shape} vs {want}")
    return (
        ShapedArray(q.shape, q.dtype),
        ShapedArray(k_cache.shape, k_cache.dtype),
        ShapedArray(v_cache.shape, v_cache.dtype),
        ShapedArray(slot_pos.shape, slot_pos.dtype),
        ShapedArray(slot_score.shape, slot_score.dtype),
    )


h2o_attention_p = primitives._define(
    "h2o_attention", h2o_attention_reference, _h2o_abstract, multiple_results=True
)
h2o_attention_p.pallax_semantic = True  # type: ignore[attr-defined]


def h2o_attention(q, k, v, pos, valid, state: dict, cfg: H2OConfig, *, scale,
                  sliding_window=None, softcap=None):  # fmt: skip
    outs = h2o_attention_p.bind(
        q, k, v, pos, valid, state["k"], state["v"], state["pos"], state["score"],
        budget=cfg.budget, recent=cfg.recent, scale=float(scale),
        sliding_window=sliding_window, softcap=softcap,
    )  # fmt: skip
    return outs[0], dict(zip(PARTS, outs[1:], strict=True))


__all__ = [
    "H2OConfig",
    "attend_with_mass",
    "candidates",
    "evict",
    "h2o_attention",
    "h2o_attention_p",
    "step",
]
