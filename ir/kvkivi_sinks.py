"""KIVI and StreamingLLM together: a fixed-size quantized cache with attention sinks.

The composition of `compress_kv(method="kivi")` with `evict_kv(policy="sinks")`. Per
layer and sequence the cache holds

- the first `sinks` positions, in full precision (k.first / v.first; they play the
  role of KIVI's `full_first`, so no separate full_first is kept);
- KIVI's packed arrays with a fixed number of rows S = ceil(window / G) * G used as a
  ring: a quantized position p sits in row p % S, its key group in group row
  (p // G) % (S / G), so each row holds the newest quantized position of its class;
- KIVI's full-precision residual ring of R + G slots for the newest tokens.

A query at qp sees the sinks and the positions in (qp - window, qp], as with
`evict_kv("sinks")`: the quantized ring holds at least the `window` positions before
the residual, so the window is always complete. Sinks meet the query at their rank
within the cache, min(qp, sinks + window - 1), by the same query rotation as
ir/kvsinks.py, so generation runs past the context length with a fixed cache.

A call (T tokens) attends over the cache as it was before the call plus its own
tokens in full precision, then writes them (quantizing the groups that leave the
residual), so a chunk longer than the window attends exactly as token-by-token decode
would to everything before the chunk.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.core import ShapedArray

from pallax.ir import kvquant, kvsinks, primitives
from pallax.ir.kvquant import KiviConfig
from pallax.ir.kvsinks import SinkConfig

F32 = jnp.float32


def ring_rows(window: int, group_size: int) -> int:
    """Quantized rows per layer: the window rounded up to whole groups."""
    return -(-window // group_size) * group_size


def config(kivi: KiviConfig, sinks: SinkConfig) -> KiviConfig:
    """The KIVI format of the composition: the sinks are the full-precision first part."""
    return KiviConfig(kivi.bits, kivi.group_size, kivi.residual, kivi.scale_dtype, sinks.sinks)


def attend(q, k, v, state, pos, valid, cfg: KiviConfig, sinks: SinkConfig, *, theta, scaling,
           scale, sliding_window, softcap):  # fmt: skip
    """q [B, T, N, H] and the call's k, v [B, T, K, H] (rotated at their true positions)
    over the cache before the call plus the call's own tokens. -> [B, T, N, H] float32."""
    t = q.shape[1]
    g, bits, ns = cfg.group_size, cfg.bits, sinks.sinks
    s = state["k.data"].shape[2]
    nq0 = kvquant.num_quantized(pos, g, cfg.residual)[:, None]  # [B, 1]
    tpos = pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    new_pos = jnp.where(jnp.arange(t)[None, :] < valid[:, None], tpos, -1)
    first_pos = jnp.arange(ns, dtype=jnp.int32)[None, :]
    first_pos = jnp.where(first_pos < pos[:, None], first_pos, -1)  # [B, F]
    packed_pos = kvquant.ring_positions(nq0[:, 0], s)  # [B, S]: newest p < nq0, p = row (mod S)
    packed_pos = jnp.where(packed_pos >= ns, packed_pos, -1)
    res_pos = kvquant.ring_positions(pos, cfg.ring)  # [B, C]
    res_pos = jnp.where((res_pos >= nq0) & (res_pos >= ns), res_pos, -1)
    # Keys in the order [first, new, packed, residual]: sink candidates come first.
    keys = [jnp.swapaxes(k, 1, 2).astype(F32)]
    vals = [jnp.swapaxes(v, 1, 2).astype(F32)]
    if ns:
        keys.insert(0, state["k.first"].astype(F32))
        vals.insert(0, state["v.first"].astype(F32))
    keys += [
        kvquant.dequantize_keys(state["k.data"], state["k.scale"], state["k.zero"], bits, g),
        state["k.res"].astype(F32),
    ]
    vals += [
        kvquant.dequantize_values(state["v.data"], state["v.scale"], state["v.zero"], bits, g),
        state["v.res"].astype(F32),
    ]
    keys, vals = jnp.concatenate(keys, axis=2), jnp.concatenate(vals, axis=2)  # [B, K, S', H]
    kpos = jnp.concatenate(([first_pos] if ns else []) + [new_pos, packed_pos, res_pos], axis=1)
    return kvsinks.attend_keys(q, keys, vals, kpos, tpos, ns + t, sinks, theta=theta,
                               scaling=scaling, scale=scale, sliding_window=sliding_window,
                               softcap=softcap)  # fmt: skip


def kivi_sink_attention_reference(
    q, k, v, pos, valid, *state, scale, sliding_window, softcap, bits, group_size, residual,
    scale_dtype, sinks, window, theta, scaling,
):  # fmt: skip
    """Attend (cache before the call + the call), then write k/v into the fixed-size
    KIVI cache: (out [B, T, N, H] in q's dtype, *the cache arrays of cfg.parts)."""
    cfg = KiviConfig(bits, group_size, residual, scale_dtype, sinks)
    st = dict(zip(cfg.parts, state, strict=True))
    out = attend(q, k, v, st, pos, valid, cfg, SinkConfig(sinks, window), theta=theta,
                 scaling=scaling, scale=scale, sliding_window=sliding_window,
                 softcap=softcap)  # fmt: skip
    st = kvquant.write(st, k, v, pos, valid, cfg)
    return (out.astype(q.dtype), *(st[p] for p in cfg.parts))


def _abstract(q, k, v, pos, valid, *state, bits, group_size, residual, sinks, window, **_):
    b, t, n, h = q.shape
    kv = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h or n % kv:
        raise TypeError(f"kivi_sink_attention: q {q.shape}, k {k.shape}, v {v.shape} disagree")
    if pos.shape != (b,) or valid.shape != (b,):
        raise TypeError(f"kivi_sink_attention: pos {pos.shape} / valid {valid.shape} not [{b}]")
    want = len(kvquant.PARTS) + (len(kvquant.FIRST_PARTS) if sinks else 0)
    if len(state) != want:
        raise TypeError(f"kivi_sink_attention: {len(state)} cache arrays, expected {want}")
    kd, _, _, kres = state[:4]
    rows = ring_rows(window, group_size)
    if kd.shape != (b, kv, rows, h * bits // 8) or kres.shape[2:] != (residual + group_size, h):
        raise TypeError(f"kivi_sink_attention: cache {kd.shape} / {kres.shape} does not match")
    return (ShapedArray(q.shape, q.dtype), *(ShapedArray(a.shape, a.dtype) for a in state))


kivi_sink_attention_p = primitives._define(
    "kivi_sink_attention", kivi_sink_attention_reference, _abstract, multiple_results=True
)
kivi_sink_attention_p.pallax_semantic = True  # type: ignore[attr-defined]


def kivi_sink_attention(q, k, v, pos, valid, state: dict, cfg: KiviConfig, sinks: SinkConfig,
                        *, theta, scaling, scale, sliding_window=None, softcap=None):  # fmt: skip
    """(out, new state dict) for one layer's fixed-size KIVI cache with sinks."""
    outs = kivi_sink_attention_p.bind(
        q, k, v, pos, valid, *(state[p] for p in cfg.parts),
        scale=float(scale), sliding_window=sliding_window, softcap=softcap,
        bits=cfg.bits, group_size=cfg.group_size, residual=cfg.residual,
        scale_dtype=jnp.dtype(cfg.scale_dtype).name, sinks=sinks.sinks, window=sinks.window,
        theta=float(theta), scaling=float(scaling),
    )  # fmt: skip
    return outs[0], dict(zip(cfg.parts, outs[1:], strict=True))


__all__ = ["attend", "config", "kivi_sink_attention", "kivi_sink_attention_p", "ring_rows"]
