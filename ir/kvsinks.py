"""StreamingLLM's attention sinks (Xiao et al., "Efficient Streaming Language Models
with Attention Sinks"): a fixed-size cache of the first `sinks` tokens and a rolling
window of the newest `window` tokens, with positions assigned within the cache.

Slots: position p < sinks sits in slot p; a later position p in slot
sinks + (p - sinks) % window. Keys are cached rotated at their true positions, as the
model rotates them:

- a window key p and a query at qp meet at their true distance qp - p (< window), as
  in the model;
- a sink key j meets the query at their positions within the cache, j and
  min(qp, sinks + window - 1) (the query's rank among the keys it sees): the query is
  rotated on by min(qp, N - 1) - qp for the sink logits. Rotations compose, so only
  the query needs the extra rotation.

Past the model's context length the absolute RoPE angles grow (float32 keeps them to
about 1e-3 rad at position 8k and 1e-2 at 100k in the fastest channel pair); the
relative distances the model sees stay within the window.

A query at qp sees the sinks and the keys in (qp - window, qp]. Within a chunk
(prefill, score) each query sees the cache as it was before the chunk plus the chunk's
own earlier tokens, so a chunk longer than the window still attends exactly as token
by token generation would.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.core import ShapedArray

from pallax.ir import primitives

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class SinkConfig:
    sinks: int
    window: int

    @property
    def slots(self) -> int:
        return self.sinks + self.window


def slot_positions(length, cfg: SinkConfig):
    """The position each slot holds after `length` tokens (-1 when empty). [..., N]"""
    length = jnp.asarray(length, jnp.int32)[..., None]
    j = jnp.arange(cfg.slots, dtype=jnp.int32)
    last = length - 1
    ring = last - jnp.mod(last - j, cfg.window)  # newest p < length with p = j (mod window)
    ring = jnp.where(ring >= cfg.sinks, ring, -1)
    sink = jnp.where(j < length, j, -1)
    return jnp.where(j < cfg.sinks, sink, ring)


def _slot_of(p, cfg: SinkConfig):
    return jnp.where(p < cfg.sinks, p, cfg.sinks + jnp.mod(p - cfg.sinks, cfg.window))


def write(k_cache, v_cache, k, v, pos, valid, cfg: SinkConfig):
    """k, v [B, T, K, H] (pre-RoPE) at positions pos + t for t < valid -> the caches
    [B, K, N, H]; tokens the window has already passed are not written."""

    def one(kc, vc, kk, vv, p0, n):
        t = kk.shape[0]
        p = p0 + jnp.arange(t, dtype=jnp.int32)
        end = p0 + n
        keep = (p < end) & ((p < cfg.sinks) | (p >= end - cfg.window))
        idx = jnp.where(keep, _slot_of(p, cfg), cfg.slots)
        kc = kc.at[:, idx].set(jnp.swapaxes(kk, 0, 1).astype(kc.dtype), mode="drop")
        vc = vc.at[:, idx].set(jnp.swapaxes(vv, 0, 1).astype(vc.dtype), mode="drop")
        return kc, vc

    return jax.vmap(one)(k_cache, v_cache, k, v, pos, valid)


def attend(q, k, v, k_cache, v_cache, pos, valid, cfg, *, theta, scaling, scale,
           sliding_window, softcap):  # fmt: skip
    """q [B, T, N, H] and the chunk's k, v [B, T, K, H] (q and k rotated at their true
    positions, as the model does) over the cache as it was before the chunk plus the
    chunk itself. -> [B, T, N, H] float32."""
    t, ns = q.shape[1], cfg.sinks
    old = slot_positions(pos, cfg)  # [B, N]
    tpos = pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    new = jnp.where(jnp.arange(t)[None, :] < valid[:, None], tpos, -1)
    # [sink slots, chunk, window slots]: the keys that can be sinks come first.
    kpos = jnp.concatenate([old[:, :ns], new, old[:, ns:]], axis=1)  # [B, N+T]

    def order(cache, x):
        c, x = cache.astype(F32), jnp.swapaxes(x, 1, 2).astype(F32)
        return jnp.concatenate([c[:, :, :ns], x, c[:, :, ns:]], axis=2)

    return attend_keys(q, order(k_cache, k), order(v_cache, v), kpos, tpos, ns + t, cfg,
                       theta=theta, scaling=scaling, scale=scale,
                       sliding_window=sliding_window, softcap=softcap)  # fmt: skip


def attend_keys(q, keys, vals, kpos, tpos, n_cand, cfg: SinkConfig, *, theta, scaling, scale,
                sliding_window, softcap):  # fmt: skip
    """q [B, T, N, H] at tpos [B, T] over keys / vals [B, K, S', H] float32 at kpos
    [B, S'] (-1: empty), of which only the first `n_cand` can be sinks (kpos < sinks).
    A query at qp sees the sinks and (qp - window, qp]. -> [B, T, N, H] float32."""
    b, t, n, h = q.shape
    kv = keys.shape[1]
    q32 = q.astype(F32)
    qg = q32.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, keys)
    if cfg.sinks:
        # Sink keys sit at their true positions j; the query meets them at its rank within
        # the cache, min(qp, N - 1): rotate it on by that minus qp (rotations compose).
        shift = jnp.minimum(tpos, cfg.slots - 1) - tpos  # [B, T], <= 0
        q_s = primitives.rope_reference(q32, shift, theta=theta, scaling=scaling)
        ls = jnp.einsum("BTKGH,BKSH->BKGTS", q_s.reshape(qg.shape), keys[:, :, :n_cand])
        sink = (kpos[:, :n_cand] >= 0) & (kpos[:, :n_cand] < cfg.sinks)
        head = jnp.where(sink[:, None, None, None, :], ls, logits[..., :n_cand])
        logits = jnp.concatenate([head, logits[..., n_cand:]], axis=-1)
    logits = logits * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    kp, qp = kpos[:, None, :], tpos[:, :, None]  # [B, 1, S'], [B, T, 1]
    ok = (kp >= 0) & (kp <= qp) & ((kp < cfg.sinks) | (kp > qp - cfg.window))
    if sliding_window is not None:
        ok &= kp > qp - sliding_window
    logits = jnp.where(ok[:, None, None], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    probs = jnp.exp(logits - m)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, vals)
    return out.reshape(b, t, n, h)


def sink_attention_reference(
    q, k, v, k_cache, v_cache, pos, valid, *, sinks, window, theta, scaling, scale,
    sliding_window, softcap,
):  # fmt: skip
    """Attend (over the cache before the chunk plus the chunk), then write the chunk:
    (out [B, T, N, H] in q's dtype, k_cache, v_cache)."""
    cfg = SinkConfig(sinks, window)
    out = attend(q, k, v, k_cache, v_cache, pos, valid, cfg, theta=theta, scaling=scaling,
                 scale=scale, sliding_window=sliding_window, softcap=softcap)  # fmt: skip
    kc, vc = write(k_cache, v_cache, k, v, pos, valid, cfg)
    return out.astype(q.dtype), kc, vc


def _sink_abstract(q, k, v, k_cache, v_cache, pos, valid, *, sinks, window, **_):
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h or n % k.shape[2]:
        raise TypeError(f"sink_attention: q {q.shape}, k {k.shape}, v {v.shape} disagree")
    want = (b, k.shape[2], sinks + window, h)
    if k_cache.shape != want or v_cache.shape != want:
        raise TypeError(f"sink_attention: cache {k_cache.shape} must be {want}")
    if pos.shape != (b,) or valid.shape != (b,):
        raise TypeError(f"sink_attention: pos {pos.shape} / valid {valid.shape} must be [{b}]")
    return (
        ShapedArray(q.shape, q.dtype),
        ShapedArray(k_cache.shape, k_cache.dtype),
        ShapedArray(v_cache.shape, v_cache.dtype),
    )


sink_attention_p = primitives._define(
    "sink_attention", sink_attention_reference, _sink_abstract, multiple_results=True
)
sink_attention_p.pallax_semantic = True  # type: ignore[attr-defined]


def sink_attention(q, k, v, k_cache, v_cache, pos, valid, cfg: SinkConfig, *, theta, scaling,
                   scale, sliding_window=None, softcap=None):  # fmt: skip
    return sink_attention_p.bind(
        q, k, v, k_cache, v_cache, pos, valid, sinks=cfg.sinks, window=cfg.window,
        theta=float(theta), scaling=float(scaling), scale=float(scale),
        sliding_window=sliding_window, softcap=softcap,
    )  # fmt: skip


__all__ = [
    "SinkConfig",
    "attend",
    "attend_keys",
    "sink_attention",
    "sink_attention_p",
    "slot_positions",
    "write",
]
