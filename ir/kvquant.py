"""KIVI's quantized KV cache (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache"): the format, the write and the reference attention.

Per layer and sequence, with b bits, group size G and a residual of R tokens:

- keys are quantized per channel: each group of G consecutive tokens has, for every
  channel h, its own scale and zero point (min) over those G tokens;
- values are quantized per token: each group of G consecutive channels of a token has
  its own scale and zero point;
- the newest tokens stay in full precision in a ring of C = R + G slots: position p
  sits in slot p % C. With L tokens written, positions below
  `nq(L) = G * floor(max(L - R, 0) / G)` are read from the quantized arrays and the
  rest (at least R once L >= R, fewer than R + G) from the ring, so the window is
  quantized one group at a time as it fills.

Values are packed along the head dimension H, 8 / b to a byte, in a "strided" layout
(byte j of a token holds channels j, j + H/m, j + 2H/m, ... for m = 8 / b values per
byte), so unpacking is shifts and a concatenation. Scales and zero points are stored in
`scale_dtype` (bfloat16 by default: KIVI-2 then takes 48 bytes per token and KV head
for H = 64 and G = 32, 3/16 of a bfloat16 cache).

Arrays of one layer (batch B, KV heads K, cache length S):
    k.data [B, K, S, H*b/8] uint8   k.scale, k.zero [B, K, S/G, H]
    v.data [B, K, S, H*b/8] uint8   v.scale, v.zero [B, K, S, H/G]
    k.res, v.res [B, K, C, H] (the cache dtype)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.core import ShapedArray

from pallax.ir import primitives

F32 = jnp.float32
BITS = (2, 4, 8)
PARTS = ("k.data", "k.scale", "k.zero", "k.res", "v.data", "v.scale", "v.zero", "v.res")
FIRST_PARTS = ("k.first", "v.first")  # with full_first > 0


@dataclasses.dataclass(frozen=True)
class KiviConfig:
    bits: int = 2
    group_size: int = 32
    residual: int = 128
    scale_dtype: str = "bfloat16"
    full_first: int = 0  # leading positions kept in full precision (a multiple of G)

    @property
    def ring(self) -> int:
        return self.residual + self.group_size

    @property
    def parts(self) -> tuple[str, ...]:
        return PARTS + (FIRST_PARTS if self.full_first else ())

    def shapes(self, kv_heads: int, head_dim: int, dtype, rows=None) -> dict[str, tuple]:
        """Cache entries of one layer, as shape templates over "B" and "S" (or, with
        `rows`, a fixed number of quantized rows used as a ring: ir/kvkivi_sinks.py)."""
        g, per = self.group_size, 8 // self.bits
        s, sg = ("S", f"S/{g}") if rows is None else (rows, rows // g)
        packed = ("B", kv_heads, s, head_dim // per)
        return {
            "k.data": (packed, "uint8"),
            "k.scale": (("B", kv_heads, sg, head_dim), self.scale_dtype),
            "k.zero": (("B", kv_heads, sg, head_dim), self.scale_dtype),
            "k.res": (("B", kv_heads, self.ring, head_dim), dtype),
            "v.data": (packed, "uint8"),
            "v.scale": (("B", kv_heads, s, head_dim // g), self.scale_dtype),
            "v.zero": (("B", kv_heads, s, head_dim // g), self.scale_dtype),
            "v.res": (("B", kv_heads, self.ring, head_dim), dtype),
        } | (
            {
                "k.first": (("B", kv_heads, self.full_first, head_dim), dtype),
                "v.first": (("B", kv_heads, self.full_first, head_dim), dtype),
            }
            if self.full_first
            else {}
        )


def num_quantized(length, group_size: int, residual: int):
    """nq(L): how many leading positions are read from the quantized arrays."""
    return group_size * (jnp.maximum(length - residual, 0) // group_size)


def ring_positions(length, ring: int):
    """The position each ring slot holds after `length` tokens: the newest p < length
    with p % ring == slot (negative when no such position was written). [..., ring]"""
    j = jnp.arange(ring, dtype=jnp.int32)
    last = jnp.asarray(length, jnp.int32)[..., None] - 1
    return last - jnp.mod(last - j, ring)


# ------------------------------------------------------------------- packing
def pack(values, bits: int):
    """uint8 values < 2**bits [..., H] -> [..., H * bits / 8] (strided layout)."""
    per = 8 // bits
    if per == 1:
        return values.astype(jnp.uint8)
    parts = jnp.split(values.astype(jnp.uint8), per, axis=-1)
    out = parts[0]
    for m in range(1, per):
        out = out | (parts[m] << (m * bits))
    return out


def unpack(data, bits: int):
    """[..., H * bits / 8] uint8 -> the values [..., H] as uint8."""
    per = 8 // bits
    if per == 1:
        return data
    mask = (1 << bits) - 1
    return jnp.concatenate([(data >> (m * bits)) & mask for m in range(per)], axis=-1)


def _quantize(x, axis: int, bits: int, scale_dtype):
    """Asymmetric min/max quantization of float x along `axis` (the group)."""
    x = x.astype(F32)
    lo = jnp.min(x, axis=axis, keepdims=True)
    hi = jnp.max(x, axis=axis, keepdims=True)
    scale = ((hi - lo) / ((1 << bits) - 1)).astype(scale_dtype)
    zero = lo.astype(scale_dtype)
    s32, z32 = scale.astype(F32), zero.astype(F32)
    q = jnp.where(s32 > 0, jnp.round((x - z32) / jnp.where(s32 > 0, s32, 1.0)), 0.0)
    q = jnp.clip(q, 0, (1 << bits) - 1).astype(jnp.uint8)
    return q, jnp.squeeze(scale, axis), jnp.squeeze(zero, axis)


def quantize_keys(k, bits: int, group_size: int, scale_dtype):
    """k [..., T, H] (T a multiple of G) -> data [..., T, H*b/8], scale/zero [..., T/G, H]."""
    *lead, t, h = k.shape
    kg = k.reshape(*lead, t // group_size, group_size, h)
    q, scale, zero = _quantize(kg, -2, bits, scale_dtype)
    return pack(q.reshape(*lead, t, h), bits), scale, zero


def quantize_values(v, bits: int, group_size: int, scale_dtype):
    """v [..., T, H] -> data [..., T, H*b/8], scale/zero [..., T, H/G]."""
    *lead, t, h = v.shape
    vg = v.reshape(*lead, t, h // group_size, group_size)
    q, scale, zero = _quantize(vg, -1, bits, scale_dtype)
    return pack(q.reshape(*lead, t, h), bits), scale, zero


def dequantize_keys(data, scale, zero, bits: int, group_size: int):
    """-> float32 [..., S, H]."""
    q = unpack(data, bits).astype(F32)
    *lead, s, h = q.shape
    qg = q.reshape(*lead, s // group_size, group_size, h)
    out = qg * scale.astype(F32)[..., None, :] + zero.astype(F32)[..., None, :]
    return out.reshape(*lead, s, h)


def dequantize_values(data, scale, zero, bits: int, group_size: int):
    """-> float32 [..., S, H]."""
    q = unpack(data, bits).astype(F32)
    *lead, s, h = q.shape
    qg = q.reshape(*lead, s, h // group_size, group_size)
    out = qg * scale.astype(F32)[..., None] + zero.astype(F32)[..., None]
    return out.reshape(*lead, s, h)


# ----------------------------------------------------------------------- write
def _write_one(state, k, v, pos, valid, cfg: KiviConfig):
    """One sequence: state arrays [K, ...]; k, v [T, K, H] at positions pos .. pos+valid-1.

    The span [nq(pos), pos + valid) is gathered from the ring and the new tokens, the
    whole groups of it below nq(pos + valid) are quantized and scattered into the
    packed arrays (the rest is dropped), and the ring takes the new tokens' slots.
    """
    g, bits = cfg.group_size, cfg.bits
    sdt = jnp.dtype(cfg.scale_dtype)
    s, sg = state["k.data"].shape[1], state["k.scale"].shape[1]
    end = pos + valid
    nq0 = num_quantized(pos, g, cfg.residual)
    nq1 = num_quantized(end, g, cfg.residual)
    p, kspan, vspan = gather_span(state, k, v, pos, cfg)
    span = p.shape[0]
    kd, ks, kz = quantize_keys(kspan, bits, g, sdt)
    vd, vs, vz = quantize_values(vspan, bits, g, sdt)
    # Token rows below nq1 land at their position (modulo S: a fixed-size cache keeps
    # the newest S quantized positions as a ring); the rest index past S and drop.
    rows = jnp.where((p < nq1) & (p >= nq1 - s), jnp.mod(p, s), s)
    groups = jnp.arange(span // g, dtype=jnp.int32) * g + nq0
    grows = jnp.where((groups < nq1) & (groups >= nq1 - s), jnp.mod(groups // g, sg), sg)
    out = dict(state)
    out["k.data"] = state["k.data"].at[:, rows].set(kd, mode="drop")
    out["k.scale"] = state["k.scale"].at[:, grows].set(ks, mode="drop")
    out["k.zero"] = state["k.zero"].at[:, grows].set(kz, mode="drop")
    out["v.data"] = state["v.data"].at[:, rows].set(vd, mode="drop")
    out["v.scale"] = state["v.scale"].at[:, rows].set(vs, mode="drop")
    out["v.zero"] = state["v.zero"].at[:, rows].set(vz, mode="drop")
    write_ring(out, state, k, v, pos, end, cfg)
    _write_first(out, k, v, pos, end, cfg)
    return out


def gather_span(state, k, v, pos, cfg: KiviConfig):
    """One sequence (k, v [T, K, H]): the positions p [span] a write may quantize (whole
    groups from nq(pos), a static count covering [nq(pos), pos + T) whatever pos is) and
    their keys and values [K, span, H] float32: the ring below pos, the new tokens from it."""
    t, g = k.shape[0], cfg.group_size
    span = -(-(cfg.ring + t) // g) * g
    p = num_quantized(pos, g, cfg.residual) + jnp.arange(span, dtype=jnp.int32)
    new_i = jnp.clip(p - pos, 0, t - 1)
    from_new = (p >= pos)[None, :, None]

    def gather(res, new):  # res [K, C, H], new [T, K, H] -> [K, span, H] float32
        old = jnp.take(res, jnp.mod(p, cfg.ring), axis=1).astype(F32)
        fresh = jnp.take(jnp.swapaxes(new, 0, 1), new_i, axis=1).astype(F32)
        return jnp.where(from_new, fresh, old)

    return p, gather(state["k.res"], k), gather(state["v.res"], v)


def write_ring(out, state, k, v, pos, end, cfg: KiviConfig):
    """One sequence: ring slots whose newest position below `end` is a new token (at or
    after pos) take it, into `out`. -> (take_new [C] bool, slot_i [C]: its index in k)."""
    slot_pos = ring_positions(end, cfg.ring)  # [C]
    take_new = slot_pos >= pos
    slot_i = jnp.clip(slot_pos - pos, 0, k.shape[0] - 1)
    for name, new in (("k.res", k), ("v.res", v)):
        res = state[name]
        fresh = jnp.take(jnp.swapaxes(new, 0, 1), slot_i, axis=1).astype(res.dtype)
        out[name] = jnp.where(take_new[None, :, None], fresh, res)
    return take_new, slot_i


def _write_first(out, k, v, pos, end, cfg: KiviConfig) -> None:
    """Positions below full_first also go, unquantized, to the k/v.first arrays (one
    sequence: k, v [T, K, H]; pos, end scalars)."""
    if not cfg.full_first:
        return
    t = k.shape[0]
    j = jnp.arange(cfg.full_first, dtype=jnp.int32)
    take_new = ((j >= pos) & (j < end))[None, :, None]
    idx = jnp.clip(j - pos, 0, t - 1)
    for name, new in (("k.first", k), ("v.first", v)):
        buf = out[name]
        fresh = jnp.take(jnp.swapaxes(new, 0, 1), idx, axis=1).astype(buf.dtype)
        out[name] = jnp.where(take_new, fresh, buf)


def _first_only(firsts, k, v, pos, end, cfg):
    out = dict(firsts)
    _write_first(out, k, v, pos, end, cfg)
    return out


def write(state: dict, k, v, pos, valid, cfg: KiviConfig) -> dict:
    """Write k, v [B, T, K, H] at positions pos [B] (the first valid [B] of the T tokens;
    the others are padding and leave the cache as it is)."""
    if k.shape[1] == 1:
        return _write_token(state, k, v, pos, valid, cfg)
    return jax.vmap(lambda st, kk, vv, p, n: _write_one(st, kk, vv, p, n, cfg))(
        state, k, v, pos, valid
    )


def _write_token(state, k, v, pos, valid, cfg: KiviConfig) -> dict:
    """The decode write (T = 1), equal to `_write_one`: the token goes to ring slot
    pos % C; only when it completes a group (once every G steps per row) is the group
    leaving the window quantized, under a `lax.cond` that the other steps skip."""
    g, ring = cfg.group_size, cfg.ring
    b = k.shape[0]
    live = valid > 0
    slot = jnp.mod(pos, ring)
    out = dict(state)
    for name, new in (("k.res", k), ("v.res", v)):
        res = state[name]
        upd = jax.vmap(lambda r, n, j: lax.dynamic_update_slice(r, n, (0, j, 0)))(
            res, jnp.swapaxes(new, 1, 2).astype(res.dtype), slot
        )
        out[name] = jnp.where(live[:, None, None, None], upd, res)
    if cfg.full_first:
        firsts = jax.vmap(lambda st, kk, vv, p, n: _first_only(st, kk, vv, p, p + n, cfg))(
            {n: out[n] for n in FIRST_PARTS}, k, v, pos, valid
        )
        out.update(firsts)
    nq0 = num_quantized(pos, g, cfg.residual)
    nq1 = num_quantized(pos + valid, g, cfg.residual)
    need = live & (nq1 > nq0)  # [B]: a group [nq1 - G, nq1) leaves the window

    def quantize_group(st):
        start = jnp.maximum(nq1 - g, 0)  # [B]
        s, sg = st["k.data"].shape[2], st["k.scale"].shape[2]  # rows: a ring when fixed
        idx = jnp.mod(start[:, None] + jnp.arange(g, dtype=jnp.int32)[None, :], ring)
        new = dict(st)
        sdt = jnp.dtype(cfg.scale_dtype)
        for kind, quant in (("k", quantize_keys), ("v", quantize_values)):
            grp = jnp.take_along_axis(st[kind + ".res"], idx[:, None, :, None], axis=2)
            d, sc, z = quant(grp.astype(F32), cfg.bits, g, sdt)
            for part, val, at in (
                ("data", d, jnp.mod(start, s)),
                ("scale", sc, jnp.mod(start // g, sg) if kind == "k" else jnp.mod(start, s)),
                ("zero", z, jnp.mod(start // g, sg) if kind == "k" else jnp.mod(start, s)),
            ):  # fmt: skip
                arr = st[f"{kind}.{part}"]
                upd = jax.vmap(lambda a, x, j: lax.dynamic_update_slice(a, x, (0, j, 0)))(
                    arr, val.astype(arr.dtype), at
                )
                new[f"{kind}.{part}"] = jnp.where(need.reshape(b, 1, 1, 1), upd, arr)
        return new

    return lax.cond(jnp.any(need), quantize_group, lambda st: st, out)


# ------------------------------------------------------------------- attention
def attend(q, state: dict, pos, valid, cfg: KiviConfig, *, scale, sliding_window, softcap):
    """q [B, T, N, H] at positions pos + t over the cache after writing pos + valid
    tokens: quantized positions < nq, the ring for the rest. -> [B, T, N, H] float32."""
    b, t, n, h = q.shape
    kv = state["k.res"].shape[1]
    bits, g = cfg.bits, cfg.group_size
    s = state["k.data"].shape[2]
    length = pos + valid  # [B]
    nq = num_quantized(length, g, cfg.residual)
    keys = dequantize_keys(state["k.data"], state["k.scale"], state["k.zero"], bits, g)
    vals = dequantize_values(state["v.data"], state["v.scale"], state["v.zero"], bits, g)
    keys = [keys, state["k.res"].astype(F32)]  # -> [B, K, S+C(+F), H]
    vals = [vals, state["v.res"].astype(F32)]
    if cfg.full_first:
        keys.append(state["k.first"].astype(F32))
        vals.append(state["v.first"].astype(F32))
    keys, vals = jnp.concatenate(keys, axis=2), jnp.concatenate(vals, axis=2)
    qpos = pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    packed_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    slot_pos = ring_positions(length, cfg.ring)  # [B, C]
    nqb = nq[:, None]
    kpos = [packed_pos, slot_pos]
    stored = [(packed_pos < nqb) & (packed_pos >= cfg.full_first), slot_pos >= nqb]
    if cfg.full_first:  # the first positions that left the ring: read unquantized
        first = jnp.broadcast_to(jnp.arange(cfg.full_first, dtype=jnp.int32), (b, cfg.full_first))
        kpos.append(first)
        stored.append(first < nqb)
    kpos, stored = jnp.concatenate(kpos, axis=1), jnp.concatenate(stored, axis=1)
    ok = stored[:, None, :] & (kpos[:, None, :] >= 0) & (kpos[:, None, :] <= qpos[:, :, None])
    if sliding_window is not None:
        ok &= kpos[:, None, :] > qpos[:, :, None] - sliding_window
    qg = q.astype(F32).reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, keys) * scale
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(ok[:, None, None], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    probs = jnp.exp(logits - m)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, vals)
    return out.reshape(b, t, n, h)


# ------------------------------------------------------------------ the primitive
def kivi_attention_reference(
    q,
    k,
    v,
    pos,
    valid,
    *state,
    scale,
    sliding_window,
    softcap,
    bits,
    group_size,
    residual,
    scale_dtype,
    full_first=0,
):
    """Write k/v [B, T, K, H] (the first `valid` [B] tokens) into the KIVI cache at pos,
    then attend: (out [B, T, N, H] in q's dtype, *the 8 cache arrays of PARTS)."""
    cfg = KiviConfig(bits, group_size, residual, scale_dtype, full_first)
    st = write(dict(zip(cfg.parts, state, strict=True)), k, v, pos, valid, cfg)
    out = attend(q, st, pos, valid, cfg, scale=scale, sliding_window=sliding_window,
                 softcap=softcap)  # fmt: skip
    return (out.astype(q.dtype), *(st[p] for p in cfg.parts))


def _kivi_abstract(q, k, v, pos, valid, *state, bits, group_size, residual, full_first=0, **_):
    b, t, n, h = q.shape
    kv = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h or n % kv:
        raise TypeError(f"kivi_attention: q {q.shape}, k {k.shape}, v {v.shape} disagree")
    if pos.shape != (b,) or valid.shape != (b,):
        raise TypeError(f"kivi_attention: pos {pos.shape} / valid {valid.shape} must be [{b}]")
    want = len(PARTS) + (len(FIRST_PARTS) if full_first else 0)
    if len(state) != want:
        raise TypeError(f"kivi_attention: {len(state)} cache arrays, expected {want}")
    kd, _, _, kres = state[:4]
    if (
        kd.shape[:2] != (b, kv)
        or kd.shape[3] * 8 // bits != h
        or kres.shape[2:] != (residual + group_size, h)
    ):
        raise TypeError(f"kivi_attention: cache {kd.shape} / {kres.shape} does not match k")
    return (ShapedArray(q.shape, q.dtype), *(ShapedArray(a.shape, a.dtype) for a in state))


kivi_attention_p = primitives._define(
    "kivi_attention", kivi_attention_reference, _kivi_abstract, multiple_results=True
)
kivi_attention_p.pallax_semantic = True  # type: ignore[attr-defined]


def kivi_attention(q, k, v, pos, valid, state: dict, cfg: KiviConfig, *, scale,
                   sliding_window=None, softcap=None):  # fmt: skip
    """(out, new state dict) for one layer's KIVI cache `state` (PARTS -> array)."""
    outs = kivi_attention_p.bind(
        q, k, v, pos, valid, *(state[p] for p in cfg.parts),
        scale=float(scale), sliding_window=sliding_window, softcap=softcap,
        bits=cfg.bits, group_size=cfg.group_size, residual=cfg.residual,
        scale_dtype=jnp.dtype(cfg.scale_dtype).name, full_first=cfg.full_first,
    )  # fmt: skip
    return outs[0], dict(zip(cfg.parts, outs[1:], strict=True))


__all__ = [
    "BITS", "PARTS", "KiviConfig", "attend", "dequantize_keys", "dequantize_values",
    "kivi_attention", "kivi_attention_p",
    "num_quantized", "pack", "quantize_keys", "quantize_values", "ring_positions", "unpack",
    "write",
]  # fmt: skip
