"""KIVI's k-bit KV format (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache"): keys quantized per channel, values per token.

With b bits and group size G:

- keys: each granule of G consecutive tokens has, for every channel h, its own scale
  and zero point (min) over those G tokens;
- values: each group of G consecutive channels of a token has its own scale and zero;
- the newest tokens wait in full precision in the staging ring of C = R + G slots
  (R = `residual`); a granule is encoded when it leaves, so at least R tokens, fewer
  than R + G, are in full precision once R are written;
- the first `full_first` positions are also kept in full precision (the attention
  sinks; see passes/compress_kv.py for the measurement).

Values are packed along the head dimension, 8 / b to a byte, in a "strided" layout
(byte j of a token holds channels j, j + H/m, j + 2H/m, ... for m = 8 / b values per
byte), so unpacking is shifts and a concatenation. Scales and zero points are stored
in `scale_dtype` (bfloat16 by default: KIVI-2 then takes 48 bytes per token and KV
head for H = 64 and G = 32, 3/16 of a bfloat16 cache).

Row arrays of one layer (batch B, KV heads K, rows S):
    k.data [B, K, S, H*b/8] uint8   k.scale, k.zero [B, K, S/G, H]
    v.data [B, K, S, H*b/8] uint8   v.scale, v.zero [B, K, S, H/G]
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallax.ir.kvcache.format import F32, Format, rows_template

BITS = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Kivi(Format):
    bits: int = 2
    group_size: int = 32
    residual: int = 128
    scale_dtype: str = "bfloat16"
    full_first: int = 0
    name = "kivi"
    granule_parts = frozenset({"k.scale", "k.zero"})

    @property
    def granule(self) -> int:
        return self.group_size

    @property
    def staging(self) -> int:
        return self.residual + self.group_size

    def check(self, head_dim, prefix):
        if head_dim % self.group_size or (head_dim * self.bits) % 8:
            raise ValueError(
                f"compress_kv: head dim {head_dim} of {prefix!r} is not a multiple of "
                f"group_size={self.group_size} (values are grouped along channels)"
            )

    def row_parts(self, kv, h, dtype, rows):
        del dtype
        g, per = self.group_size, 8 // self.bits
        packed = ("B", kv, rows, h // per)
        per_group = ("B", kv, rows_template(rows, g), h)
        return {
            "k.data": (packed, "uint8"),
            "k.scale": (per_group, self.scale_dtype),
            "k.zero": (per_group, self.scale_dtype),
            "v.data": (packed, "uint8"),
            "v.scale": (("B", kv, rows, h // g), self.scale_dtype),
            "v.zero": (("B", kv, rows, h // g), self.scale_dtype),
        }

    def encode(self, k, v):
        sdt = jnp.dtype(self.scale_dtype)
        kd, ks, kz = quantize_keys(k, self.bits, self.group_size, sdt)
        vd, vs, vz = quantize_values(v, self.bits, self.group_size, sdt)
        return {"k.data": kd, "k.scale": ks, "k.zero": kz,
                "v.data": vd, "v.scale": vs, "v.zero": vz}  # fmt: skip

    def decode(self, state):
        b, g = self.bits, self.group_size
        keys = dequantize_keys(state["k.data"], state["k.scale"], state["k.zero"], b, g)
        vals = dequantize_values(state["v.data"], state["v.scale"], state["v.zero"], b, g)
        return keys, vals

    def __str__(self) -> str:
        return (f"kivi(bits={self.bits}, group_size={self.group_size}, residual={self.residual}"
                f", full_first={self.full_first}, scale_dtype={self.scale_dtype})")  # fmt: skip


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
