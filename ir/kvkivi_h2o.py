"""KIVI and H2O together: heavy-hitter eviction over a quantized cache, a group at a time.

The composition of `compress_kv(method="kivi")` with `evict_kv(policy="h2o")`. KIVI
quantizes keys per channel over groups of G consecutive tokens, so a single token
cannot leave a quantized group; here eviction works on those groups. Per layer, KV
head and sequence the cache holds

- KIVI's full-precision parts: the first `full_first` positions (never evicted) and
  the residual ring of the newest R..R+G tokens, which plays H2O's `recent` window
  (so `recent` <= R) and accumulates each token's attention mass;
- a pool of `pool` quantized token rows = pool / G group slots, each with the start
  position of its group (+1; 0 = empty) and its accumulated attention mass (the sum
  over its tokens).

A call (T tokens) attends over the cache before the call plus its own tokens (the
attention returns each key's mass, as H2O's op does), adds the masses to the scores,
writes its tokens to the residual, and every group that leaves the residual is
quantized and competes with the pool: the pool keeps the `pool / G` groups with the
largest mass. As in ir/kvh2o.py, true positions are kept, so the context length
bounds generation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.core import ShapedArray

from pallax.ir import kvh2o, kvquant, primitives
from pallax.ir.kvquant import KiviConfig

F32 = jnp.float32
EXTRA = ("h2o.gpos", "h2o.group.score", "h2o.res.score")


@dataclasses.dataclass(frozen=True)
class KiviH2OConfig:
    bits: int
    group_size: int
    residual: int
    scale_dtype: str
    full_first: int
    pool: int  # quantized heavy-hitter rows, a multiple of group_size

    @property
    def kivi(self) -> KiviConfig:
        return KiviConfig(
            self.bits, self.group_size, self.residual, self.scale_dtype, self.full_first
        )

    @property
    def slots(self) -> int:
        return self.pool // self.group_size

    @property
    def parts(self) -> tuple[str, ...]:
        return self.kivi.parts + EXTRA

    def shapes(self, kv_heads: int, head_dim: int, dtype) -> dict[str, tuple]:
        ring = self.kivi.ring
        return self.kivi.shapes(kv_heads, head_dim, dtype, rows=self.pool) | {
            "h2o.gpos": (("B", kv_heads, self.slots), "int32"),
            "h2o.group.score": (("B", kv_heads, self.slots), "float32"),
            "h2o.res.score": (("B", kv_heads, ring), "float32"),
        }


def check(kivi: KiviConfig, budget: int, recent: int) -> int:
    """The pool size for an H2O `budget` / `recent` over a KIVI cache, or a clear error."""
    g, r = kivi.group_size, kivi.residual
    if recent > r:
        raise ValueError(
            f"evict_kv(h2o) with compress_kv: recent={recent} must be <= the KIVI "
            f"residual={r} (the residual is the window H2O always keeps)"
        )
    pool = (budget - recent) // g * g
    if pool < g:
        raise ValueError(
            f"evict_kv(h2o) with compress_kv: budget={budget} - recent={recent} must hold at "
            f"least one group of group_size={g} quantized tokens"
        )
    return pool


def _candidates(state, k, v, pos, valid, cfg: KiviH2OConfig):
    """Keys, values and positions [B, K, S'] of [first, pool, residual, new]."""
    b, t, kv, _ = k.shape
    g, ff, ring = cfg.group_size, cfg.full_first, cfg.kivi.ring
    nq0 = kvquant.num_quantized(pos, g, cfg.residual)[:, None]  # [B, 1]
    tpos = pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    new_pos = jnp.where(jnp.arange(t)[None, :] < valid[:, None], tpos, -1)
    start = state["h2o.gpos"] - 1  # [B, K, P/G]
    pool_pos = start[..., None] + jnp.arange(g, dtype=jnp.int32)
    pool_pos = jnp.where(start[..., None] >= 0, pool_pos, -1).reshape(b, kv, cfg.pool)
    res_pos = kvquant.ring_positions(pos, ring)  # [B, C]
    res_pos = jnp.where(res_pos >= nq0, res_pos, -1)
    bk = lambda x: jnp.broadcast_to(x[:, None], (b, kv, x.shape[-1]))  # noqa: E731
    bits = cfg.bits
    keys = [
        kvquant.dequantize_keys(state["k.data"], state["k.scale"], state["k.zero"], bits, g),
        state["k.res"].astype(F32),
        jnp.swapaxes(k, 1, 2).astype(F32),
    ]
    vals = [
        kvquant.dequantize_values(state["v.data"], state["v.scale"], state["v.zero"], bits, g),
        state["v.res"].astype(F32),
        jnp.swapaxes(v, 1, 2).astype(F32),
    ]
    kpos = [pool_pos, bk(res_pos), bk(new_pos)]
    if ff:  # the first positions are read unquantized once they left the residual
        first = jnp.arange(ff, dtype=jnp.int32)[None, :]
        keys.insert(0, state["k.first"].astype(F32))
        vals.insert(0, state["v.first"].astype(F32))
        kpos.insert(0, bk(jnp.where(first < nq0, first, -1)))
    cat = lambda xs: jnp.concatenate(xs, axis=2)  # noqa: E731
    return cat(keys), cat(vals), cat(kpos), tpos


def _admit(state, k, v, mass_new, res_score, pos, valid, cfg: KiviH2OConfig):
    """One sequence ([K, ...] arrays; k, v [T, K, H]; mass_new [K, T]): quantize the
    groups leaving the residual and keep the heaviest `slots` of pool + leaving."""
    g, ring, bits, n_slots = cfg.group_size, cfg.kivi.ring, cfg.bits, cfg.slots
    sdt = jnp.dtype(cfg.scale_dtype)
    t = k.shape[0]
    kv = state["k.data"].shape[0]
    end = pos + valid
    nq0 = kvquant.num_quantized(pos, g, cfg.residual)
    nq1 = kvquant.num_quantized(end, g, cfg.residual)
    p, kspan, vspan = kvquant.gather_span(state, k, v, pos, cfg.kivi)
    span = p.shape[0]
    from_new = p >= pos
    new_i = jnp.clip(p - pos, 0, t - 1)
    kd, ks, kz = kvquant.quantize_keys(kspan, bits, g, sdt)
    vd, vs, vz = kvquant.quantize_values(vspan, bits, g, sdt)
    span_score = jnp.where(
        from_new[None], jnp.take(mass_new, new_i, axis=1), jnp.take(res_score, jnp.mod(p, ring), 1)
    )  # [K, span]
    n_leave = span // g
    lstart = nq0 + jnp.arange(n_leave, dtype=jnp.int32) * g
    leaving = (lstart < nq1) & (lstart + g > cfg.full_first)  # [L]
    lscore = jnp.where(leaving[None], span_score.reshape(kv, n_leave, g).sum(-1), -jnp.inf)
    start = state["h2o.gpos"] - 1  # [K, P/G]
    pscore = jnp.where(start >= 0, state["h2o.group.score"], -jnp.inf)
    cand = jnp.concatenate([pscore, lscore], axis=1)  # [K, P/G + L]
    score, keep = lax.top_k(cand, n_slots)  # [K, P/G]

    def pick(pool_arr, new_arr, per_group):
        """Concatenate the pool's and the leaving groups' rows by group; keep `keep`."""
        if per_group:  # [K, P/G, ...] and [K, L, ...]
            both = jnp.concatenate([pool_arr, new_arr.astype(pool_arr.dtype)], axis=1)
            idx = keep.reshape(keep.shape + (1,) * (both.ndim - 2))
            return jnp.take_along_axis(both, idx, axis=1)
        rest = pool_arr.shape[2:]
        a = pool_arr.reshape(kv, n_slots, g, *rest)
        b_ = new_arr.astype(pool_arr.dtype).reshape(kv, n_leave, g, *rest)
        both = jnp.concatenate([a, b_], axis=1)
        idx = keep.reshape(keep.shape + (1,) * (both.ndim - 2))
        return jnp.take_along_axis(both, idx, axis=1).reshape(pool_arr.shape)

    out = dict(state)
    for name, new, per_group in (
        ("k.data", kd, False), ("k.scale", ks, True), ("k.zero", kz, True),
        ("v.data", vd, False), ("v.scale", vs, False), ("v.zero", vz, False),
    ):  # fmt: skip
        out[name] = pick(state[name], new, per_group)
    starts = jnp.concatenate([start, jnp.broadcast_to(lstart, (kv, n_leave))], axis=1)
    kept = jnp.isfinite(score)
    out["h2o.gpos"] = jnp.where(kept, jnp.take_along_axis(starts, keep, axis=1) + 1, 0)
    out["h2o.group.score"] = jnp.where(kept, score, 0.0)
    return out


def _write_residual(state, k, v, mass_new, res_score, pos, valid, cfg: KiviH2OConfig):
    """One sequence: the new tokens take their residual slots (with their mass as the
    slot's score); the first positions go to the full-precision first part."""
    end = pos + valid
    out = dict(state)
    take_new, slot_i = kvquant.write_ring(out, state, k, v, pos, end, cfg.kivi)
    out["h2o.res.score"] = jnp.where(take_new[None], jnp.take(mass_new, slot_i, 1), res_score)
    kvquant._write_first(out, k, v, pos, end, cfg.kivi)
    return out


def step(q, k, v, state: dict, pos, valid, cfg: KiviH2OConfig, *, scale, sliding_window,
         softcap):  # fmt: skip
    """Attend (returning the mass), score, write and evict: (out float32, new state)."""
    b, t = q.shape[:2]
    keys, vals, kpos, tpos = _candidates(state, k, v, pos, valid, cfg)
    real = jnp.arange(t)[None, :] < valid[:, None]
    out, mass = kvh2o.attend_with_mass(
        q, keys, vals, kpos, tpos, scale=scale, sliding_window=sliding_window, softcap=softcap,
        weights=real,
    )  # fmt: skip
    ff, pool, ring = cfg.full_first, cfg.pool, cfg.kivi.ring
    m_pool = mass[:, :, ff : ff + pool]
    m_res = mass[:, :, ff + pool : ff + pool + ring]
    m_new = mass[:, :, ff + pool + ring :]  # [B, K, T]
    kv = k.shape[2]
    state = dict(state)
    state["h2o.group.score"] = state["h2o.group.score"] + m_pool.reshape(
        b, kv, cfg.slots, cfg.group_size
    ).sum(-1)
    res_score = state["h2o.res.score"] + m_res
    g = cfg.group_size
    nq0 = kvquant.num_quantized(pos, g, cfg.residual)
    nq1 = kvquant.num_quantized(pos + valid, g, cfg.residual)
    admit = jax.vmap(lambda st, kk, vv, m, rs, p, n: _admit(st, kk, vv, m, rs, p, n, cfg))
    # Decode leaves a group once every G steps: skip the admission on the other steps.
    state = lax.cond(
        jnp.any(nq1 > nq0),
        lambda st: admit(st, k, v, m_new, res_score, pos, valid),
        lambda st: st,
        state,
    )
    write = jax.vmap(lambda st, kk, vv, m, rs, p, n: _write_residual(st, kk, vv, m, rs, p, n, cfg))
    return out, write(state, k, v, m_new, res_score, pos, valid)


def kivi_h2o_attention_reference(
    q, k, v, pos, valid, *state, scale, sliding_window, softcap, bits, group_size, residual,
    scale_dtype, full_first, pool,
):  # fmt: skip
    """(out [B, T, N, H] in q's dtype, *the cache arrays of cfg.parts)."""
    cfg = KiviH2OConfig(bits, group_size, residual, scale_dtype, full_first, pool)
    st = dict(zip(cfg.parts, state, strict=True))
    out, st = step(q, k, v, st, pos, valid, cfg, scale=scale, sliding_window=sliding_window,
                   softcap=softcap)  # fmt: skip
    return (out.astype(q.dtype), *(st[p] for p in cfg.parts))


def _abstract(q, k, v, pos, valid, *state, bits, group_size, residual, full_first, pool, **_):
    b, t, n, h = q.shape
    kv = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h or n % kv:
        raise TypeError(f"kivi_h2o_attention: q {q.shape}, k {k.shape}, v {v.shape} disagree")
    want = len(kvquant.PARTS) + (len(kvquant.FIRST_PARTS) if full_first else 0) + len(EXTRA)
    if len(state) != want:
        raise TypeError(f"kivi_h2o_attention: {len(state)} cache arrays, expected {want}")
    kd = state[0]
    if kd.shape != (b, kv, pool, h * bits // 8):
        raise TypeError(f"kivi_h2o_attention: cache {kd.shape} does not match k / pool={pool}")
    return (ShapedArray(q.shape, q.dtype), *(ShapedArray(a.shape, a.dtype) for a in state))


kivi_h2o_attention_p = primitives._define(
    "kivi_h2o_attention", kivi_h2o_attention_reference, _abstract, multiple_results=True
)
kivi_h2o_attention_p.pallax_semantic = True  # type: ignore[attr-defined]


def kivi_h2o_attention(q, k, v, pos, valid, state: dict, cfg: KiviH2OConfig, *, scale,
                       sliding_window=None, softcap=None):  # fmt: skip
    """(out, new state dict) for one layer's quantized H2O cache."""
    outs = kivi_h2o_attention_p.bind(
        q, k, v, pos, valid, *(state[p] for p in cfg.parts),
        scale=float(scale), sliding_window=sliding_window, softcap=softcap,
        bits=cfg.bits, group_size=cfg.group_size, residual=cfg.residual,
        scale_dtype=jnp.dtype(cfg.scale_dtype).name, full_first=cfg.full_first, pool=cfg.pool,
    )  # fmt: skip
    return outs[0], dict(zip(cfg.parts, outs[1:], strict=True))


__all__ = ["EXTRA", "KiviH2OConfig", "check", "kivi_h2o_attention", "kivi_h2o_attention_p", "step"]
