"""pallax's packed weight format: int8 or int4 values in groups along the input axis.

One `QuantizedWeight` stands for a float matrix w [O, I] (output-major, as every
`linear` weight in pallax):

    w[o, i] = value(o, i) * scale[o, i // g] + offset[o, i // g]     (offset may be None)

- bits=8: `data` is int8 [O, Ip]; value = data (signed; with an offset it may hold
  0..31 as GGUF's Q5 formats do).
- bits=4: `data` is uint8 [O, Ip // 2], two values per byte, 0..15 (with an offset;
  symmetric int4 is offset = -8 * scale). Within each group of g input features,
  byte k holds feature k in its low nibble and feature k + g/2 in its high nibble,
  so a group's bytes unpack to two contiguous halves without interleaving.
- Ip = G * g where G = ceil(I / g): when g does not divide I, the last group is
  partial and its padding columns hold zeros (x is zero-padded to Ip before a
  dot, so they contribute nothing).
- `outlier_idx` int32 [K] / `outlier_w` float32 [O, K]: LLM.int8()'s decomposition.
  The input features in `outlier_idx` are computed in float against `outlier_w`;
  their columns in `data` are zero.

Per output channel int8 is bits=8 with g = I (G = 1) and no offset.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (4, 8)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    data: jax.Array
    scale: jax.Array
    offset: jax.Array | None
    outlier_idx: jax.Array | None
    outlier_w: jax.Array | None
    bits: int = dataclasses.field(metadata=dict(static=True), default=8)
    group_size: int = dataclasses.field(metadata=dict(static=True), default=0)
    in_features: int = dataclasses.field(metadata=dict(static=True), default=0)

    @property
    def shape(self) -> tuple[int, int]:
        """The float matrix this stands for: [O, I]."""
        return (self.data.shape[0], self.in_features)

    @property
    def out_features(self) -> int:
        return self.data.shape[0]

    @property
    def groups(self) -> int:
        return self.scale.shape[1]

    @property
    def padded_in(self) -> int:
        return self.groups * self.group_size

    @property
    def per_channel(self) -> bool:
        return self.bits == 8 and self.groups == 1 and self.offset is None

    def describe(self) -> str:
        kind = "per channel" if self.groups == 1 else f"g{self.group_size}"
        extra = f", {self.outlier_idx.shape[0]} outliers" if self.outlier_idx is not None else ""
        return f"int{self.bits} {kind}{', offset' if self.offset is not None else ''}{extra}"

    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self))


def _register_export_serialization() -> None:
    """Let `jax.export` serialize functions that take packed weights (artifacts)."""
    import json

    from jax import export

    export.register_pytree_node_serialization(
        QuantizedWeight,
        serialized_name="pallax.QuantizedWeight",
        serialize_auxdata=lambda aux: json.dumps(list(aux)).encode(),
        deserialize_auxdata=lambda data: tuple(json.loads(data)),
    )


_register_export_serialization()


def check(w: QuantizedWeight) -> None:
    """Raise TypeError when the arrays disagree with the format described above."""
    o, g, i = w.out_features, w.group_size, w.in_features
    if w.bits not in SUPPORTED_BITS:
        raise TypeError(f"QuantizedWeight bits={w.bits}; allowed {SUPPORTED_BITS}")
    if g <= 0 or (w.bits == 4 and g % 2):
        raise TypeError(f"QuantizedWeight group_size={g} must be positive (even for int4)")
    groups = math.ceil(i / g)
    want = (o, groups * g) if w.bits == 8 else (o, groups * g // 2)
    dtype = jnp.int8 if w.bits == 8 else jnp.uint8
    if tuple(w.data.shape) != want or w.data.dtype != dtype:
        got = f"{w.data.dtype}{tuple(w.data.shape)}"
        raise TypeError(f"QuantizedWeight data {got}: expected {jnp.dtype(dtype).name}{want}")
    for name in ("scale", "offset"):
        a = getattr(w, name)
        if a is not None and tuple(a.shape) != (o, groups):
            raise TypeError(f"QuantizedWeight {name} {a.shape}: expected {(o, groups)}")
    if (w.outlier_idx is None) != (w.outlier_w is None):
        raise TypeError("QuantizedWeight outlier_idx and outlier_w go together")
    if w.outlier_idx is not None and tuple(w.outlier_w.shape) != (o, w.outlier_idx.shape[0]):
        raise TypeError(
            f"QuantizedWeight outlier_w {w.outlier_w.shape}: expected {(o, w.outlier_idx.shape[0])}"
        )


# ------------------------------------------------------------------ packing nibbles
def pack_int4(values, group_size: int):
    """values uint8 [O, Ip] in 0..15 -> uint8 [O, Ip // 2] in the group-halves layout."""
    xp = jnp if isinstance(values, jax.Array) else np
    o, ip = values.shape
    v = values.reshape(o, ip // group_size, 2, group_size // 2).astype(xp.uint8)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(o, ip // 2)


def unpack_int4(data, group_size: int):
    """uint8 [O, Ip // 2] -> uint8 [O, Ip] values 0..15 (the inverse of pack_int4)."""
    xp = jnp if isinstance(data, jax.Array) else np
    o, half = data.shape
    d = data.reshape(o, half * 2 // group_size, group_size // 2)
    v = xp.stack([d & 15, d >> 4], axis=2)
    return v.reshape(o, half * 2)


def values(w: QuantizedWeight):
    """The integer values [O, Ip] (int8 for bits=8, uint8 0..15 for bits=4)."""
    return w.data if w.bits == 8 else unpack_int4(w.data, w.group_size)


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The float matrix [O, I] (jnp; traceable). Outlier columns are put back."""
    o, g = w.out_features, w.group_size
    v = values(w).astype(jnp.float32).reshape(o, w.groups, g)
    f = v * w.scale[..., None]
    if w.offset is not None:
        f = f + w.offset[..., None]
    f = f.reshape(o, w.padded_in)[:, : w.in_features]
    if w.outlier_idx is not None:
        f = f.at[:, w.outlier_idx].set(w.outlier_w)
    return f.astype(dtype)


def pad_columns(w, group_size: int):
    """Zero-pad a float [O, I] matrix (numpy) to a whole number of groups."""
    o, i = w.shape
    ip = math.ceil(i / group_size) * group_size
    if ip == i:
        return w
    return np.concatenate([w, np.zeros((o, ip - i), w.dtype)], axis=1)


# ------------------------------------------------------------ round to nearest (numpy)
def quantize_rtn(w, bits: int, group_size: int | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of a float [O, I] matrix.

    bits=8 with group_size None: symmetric int8, one scale per output channel.
    bits=4: asymmetric int4 per group (scale and offset from each group's min/max;
    see int4_params). The last group may be partial.
    """
    if isinstance(w, jax.ShapeDtypeStruct):
        return _abstract_rtn(w.shape, bits, group_size)
    w = np.asarray(jnp.asarray(w, jnp.float32))
    o, i = w.shape
    if bits == 8:
        g = group_size or i
        wp = pad_columns(w, g).reshape(o, -1, g)
        scale = np.abs(wp).max(axis=2) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(wp / scale[..., None]), -127, 127).astype(np.int8)
        return QuantizedWeight(
            jnp.asarray(q.reshape(o, -1)), jnp.asarray(scale), None, None, None, 8, g, i
        )
    if bits != 4 or not group_size:
        raise ValueError(f"quantize_rtn: bits={bits} group_size={group_size} not supported")
    g = group_size
    q, scale, offset = rtn_int4_groups(w, g)
    return QuantizedWeight(
        jnp.asarray(pack_int4(q, g)), jnp.asarray(scale), jnp.asarray(offset), None, None, 4, g, i
    )


def int4_params(lo, hi):
    """Scale and offset of a 4-bit grid over [lo, hi] that has 0.0 on it: w = q*scale + offset.

    The zero point is an integer: weights near zero, most of a group, round to
    exactly 0.0 instead of all to the same nearby level (a shift that adds up
    coherently across the group's dot product: +75% perplexity against +32% on
    SmolLM2 at g128).
    """
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    scale = (hi - lo) / 15.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, 15)
    return scale, (-zero * scale).astype(np.float32)


# Range shrink factors tried per group. Searching (1.0 .. 0.75, least squared error, as
# GPTQ's `mse` option does) made SmolLM2 int4 g128 RTN worse, +46.6% perplexity against
# +32.4% with the full range: clipping a group's few extreme weights costs more in these
# small models than the finer step gains. So the full range only, until a better criterion
# (e.g. weighted by activation statistics) is measured.
SHRINK = (1.0,)


def int4_fit(cols, axis: int = 0):
    """int4_params for the values along `axis`, with the range shrunk by the SHRINK factor
    that gives the least squared rounding error (see SHRINK for why it is 1.0 alone)."""
    cols = np.asarray(cols, np.float32)
    lo, hi = cols.min(axis=axis), cols.max(axis=axis)
    best = None
    for p in SHRINK:
        scale, offset = int4_params(lo * p, hi * p)
        s, o = np.expand_dims(scale, axis), np.expand_dims(offset, axis)
        q = np.clip(np.rint((cols - o) / s), 0, 15)
        err = np.square(q * s + o - cols).sum(axis=axis)
        if best is None:
            best = [err, scale, offset]
        else:
            better = err < best[0]
            best = [np.where(better, err, best[0]), np.where(better, scale, best[1]),
                    np.where(better, offset, best[2])]  # fmt: skip
    return best[1].astype(np.float32), best[2].astype(np.float32)


def rtn_int4_groups(w, g: int):
    """w [O, I] float -> (values uint8 [O, Ip], scale [O, G], offset [O, G]).

    A group that already sits on a 16-level grid (every group of a GGUF Q4_0 / Q4_1
    model at g32) is kept exactly on that grid (scale (max-min)/15, offset min);
    every other group gets int4_fit's grid (0.0 on it, range searched for least error).
    """
    o, i = w.shape
    groups = math.ceil(i / g)
    lo = np.full((o, groups), np.inf, np.float32)
    hi = np.full((o, groups), -np.inf, np.float32)
    scale = np.empty((o, groups), np.float32)
    offset = np.empty((o, groups), np.float32)
    for j in range(groups):  # per group over real columns only (the last may be partial)
        cols = w[:, j * g : min((j + 1) * g, i)]
        lo[:, j], hi[:, j] = cols.min(axis=1), cols.max(axis=1)
        scale[:, j], offset[:, j] = int4_fit(cols, axis=1)
    wp = pad_columns(w, g).reshape(o, groups, g)
    real = (np.arange(groups * g) < i).reshape(groups, g)

    def fit(scale, offset):
        q = np.clip(np.rint((wp - offset[..., None]) / scale[..., None]), 0, 15)
        err = np.abs(q * scale[..., None] + offset[..., None] - wp) * real
        return q, err.max(axis=2)

    q, _ = fit(scale, offset)
    g_scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
    g_q, g_err = fit(g_scale, lo)
    on_grid = g_err <= 1e-3 * g_scale
    q = np.where(on_grid[..., None], g_q, q)
    scale = np.where(on_grid, g_scale, scale)
    offset = np.where(on_grid, lo, offset).astype(np.float32)
    q = q.reshape(o, groups * g).astype(np.uint8)
    if groups * g > i:
        q[:, i:] = 0
    return q, scale.astype(np.float32), offset


def _abstract_rtn(shape, bits: int, group_size: int | None) -> QuantizedWeight:
    """The abstract QuantizedWeight of an abstract [O, I] weight: one row quantized for
    real, every array's rows then widened to O (each array is [O, ...])."""
    o, i = shape
    row = quantize_rtn(np.zeros((1, i), np.float32), bits, group_size)
    wide = {f: jax.ShapeDtypeStruct((o, *getattr(row, f).shape[1:]), getattr(row, f).dtype)
            for f in ("data", "scale", "offset") if getattr(row, f) is not None}  # fmt: skip
    return dataclasses.replace(row, **wide)
