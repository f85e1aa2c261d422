"""GGUF block-quantized tensors as pallax `QuantizedWeight`s, without a float round trip.

A GGUF linear weight is already quantized; dequantizing it to float32 and quantizing
again would both cost memory and lose the file's exact values. `keep_quantized`
re-lays out the integer values into pallax's packed format (`ir/qformat.py`) and
turns each block's float16 scales into float32 group scales and offsets, computing
products such as d * sc in float32 as ggml does. `qformat.dequantize` of the result
equals `gguf.quants.dequantize` of the bytes bit for bit (see the tests): f16 times a
small integer is exact in float32, so the only rounding is the one ggml does too.

    type   block          pallax    g    value               scale    offset
    Q8_0   32             int8      32   q (-128..127)        d        -
    Q4_0   32             int4      32   q (0..15)            d        -8 d
    Q4_1   32             int4      32   q (0..15)            d        m
    Q5_0   32             int8      32   q - 16 (-16..15)     d        -
    Q5_1   32             int8      32   q (0..31)            d        m
    Q4_K   256 = 8 x 32   int4      32   q (0..15)            d sc_j   -dmin m_j
    Q5_K   256 = 8 x 32   int8      32   q (0..31)            d sc_j   -dmin m_j
    Q6_K   256 = 16 x 16  int8      16   q - 32 (-32..31)     d sc_j   -

The block layouts are ggml's C structs (`block_q4_K` ...), written as numpy structured
dtypes; gguf.quants' dequantizers are the reference. Blocks are converted in chunks
that fit in cache; within a chunk every array operation runs on contiguous rows
(fields are first copied out as opaque `V16`/`V32` items, which numpy copies fast,
and results are written back the same way).

The arrays of the result are numpy (host memory); the caller places them on devices
(`jax.device_put` takes the whole `QuantizedWeight`, a pytree).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pallax.ir.qformat import QuantizedWeight

_T = GGMLQuantizationType
FLOAT_TYPES = (_T.F32, _T.F16, _T.BF16)
KEEPABLE_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
CHUNK_ELEMENTS = 1 << 18  # weights converted per step (temporaries stay in cache)


def keep_quantized(raw: np.ndarray, ggml_type, shape: tuple[int, int]) -> QuantizedWeight | None:
    """A GGUF tensor's bytes as a `QuantizedWeight` standing for the float matrix [O, I].

    raw: the tensor's bytes (uint8, any shape, e.g. `GGUFFile.raw(t)`); ggml_type: a
    `gguf.GGMLQuantizationType` (or its number); shape: (O, I) in numpy order.
    Returns None for float tensors (F32, F16, BF16), which the caller keeps as floats.
    Raises ValueError for other types and for bytes that do not fit the shape.
    """
    try:
        qtype = _T(ggml_type)
    except ValueError:
        raise ValueError(f"unknown GGML type {ggml_type!r}") from None
    if qtype in FLOAT_TYPES:
        return None
    if qtype.name not in KEEPABLE_TYPES:
        raise ValueError(
            f"GGML type {qtype.name} cannot be kept quantized; supported: {KEEPABLE_TYPES} "
            f"(and {tuple(t.name for t in FLOAT_TYPES)}, kept as floats)"
        )
    if len(shape) != 2:
        raise ValueError(f"keep_quantized takes a 2-D shape (O, I); got {shape=}")
    o, i = (int(n) for n in shape)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if o <= 0 or i <= 0 or i % block:
        raise ValueError(
            f"{qtype.name}: {shape=} needs positive sizes and I a multiple of the block "
            f"size {block}"
        )
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise ValueError(f"{qtype.name}: raw must be uint8 bytes; got {raw.dtype}")
    n = o * (i // block)
    if raw.size != n * type_size:
        raise ValueError(
            f"{qtype.name} [{o}, {i}]: expected {n * type_size} bytes ({n} blocks of "
            f"{type_size}); got {raw.size}"
        )
    layout, convert, bits, g, has_offset = _TYPES[qtype.name]
    blocks = np.ascontiguousarray(raw).reshape(-1).view(layout)  # [n] structs
    values = np.empty((n, block if bits == 8 else block // 2), np.uint8)
    scale = np.empty((n, block // g), np.float32)
    offset = np.empty((n, block // g), np.float32) if has_offset else None
    step = max(1, CHUNK_ELEMENTS // block)
    for start in range(0, n, step):
        part = slice(start, start + step)
        convert(blocks[part], values[part], scale[part], None if offset is None else offset[part])
    return QuantizedWeight(
        values.view(np.int8).reshape(o, -1) if bits == 8 else values.reshape(o, -1),
        scale.reshape(o, -1),
        None if offset is None else offset.reshape(o, -1),
        None,
        None,
        bits,
        g,
        i,
    )


# ------------------------------------------------------------------------- helpers
def _struct(itemsize: int, **fields) -> np.dtype:
    """A C struct as a numpy dtype: fields name=(format, byte offset)."""
    names = list(fields)
    return np.dtype(
        dict(
            names=names,
            formats=[fields[k][0] for k in names],
            offsets=[fields[k][1] for k in names],
            itemsize=itemsize,
        )
    )


def _rows(field: np.ndarray) -> np.ndarray:
    """A struct field (or a column of one) as contiguous uint8 [n, field bytes]."""
    return field.copy().view(np.uint8).reshape(len(field), -1)


def _put(out: np.ndarray, parts: list[np.ndarray]) -> None:
    """out uint8 [n, k * w] = the uint8 [n, w] parts side by side."""
    w = parts[0].shape[1]
    cells = out.view(f"V{w}")  # [n, k]
    for j, part in enumerate(parts):
        cells[:, j] = part.view(f"V{w}")[:, 0]


def _spread_table(shift: int) -> np.ndarray:
    """byte -> uint64 whose byte t is (bit t of the byte) << shift."""
    table = np.zeros(256, np.uint64)
    for t in range(8):
        table |= ((np.arange(256, dtype=np.uint64) >> t) & 1) << np.uint64(8 * t + shift)
    return table


_SPREAD_BIT4 = _spread_table(4)


def _q5_values(blk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q5_0 / Q5_1: values 0..31 for elements 0..15 and 16..31, uint8 [n, 16] each.
    qs byte k holds elements k (low nibble) and k + 16; bit e of the little-endian
    uint32 qh is element e's fifth bit."""
    qs = _rows(blk["qs"])
    high = _SPREAD_BIT4[_rows(blk["qh"])].view("V16")  # [n, 2]: element e's bit << 4
    return (qs & np.uint8(0x0F)) | _rows(high[:, 0]), (qs >> np.uint8(4)) | _rows(high[:, 1])


def _k_scales(blk: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> None:
    """Q4_K / Q5_K: scale = d * sc_j, offset = -(dmin * m_j) for the 8 sub-blocks, from
    12 bytes of packed 6-bit scales and mins (gguf.quants.Q4_K.get_scale_min)."""
    packed = blk["scales"]  # [n, 3] of V4
    d, m, m_d = _rows(packed[:, 0]), _rows(packed[:, 1]), _rows(packed[:, 2])
    sc = np.empty((len(blk), 8), np.uint8)
    mn = np.empty((len(blk), 8), np.uint8)
    _put(sc, [d & np.uint8(0x3F), (m_d & np.uint8(0x0F)) | ((d >> np.uint8(2)) & np.uint8(0x30))])
    _put(mn, [m & np.uint8(0x3F), (m_d >> np.uint8(4)) | ((m >> np.uint8(2)) & np.uint8(0x30))])
    np.multiply(blk["d"].astype(np.float32)[:, None], sc, out=scale, dtype=np.float32)
    np.multiply(blk["dmin"].astype(np.float32)[:, None], mn, out=offset, dtype=np.float32)
    np.negative(offset, out=offset)


# ------------------------------------------------------------------------ per type
# Each converter writes one chunk: blk [n] structs -> values uint8 [n, bytes] (int8
# bytes for bits=8, group-halves nibbles for bits=4), scale / offset float32 [n, G].
def _q8_0(blk, values, scale, offset):
    values.view("V32")[:, 0] = blk["qs"]
    scale[:, 0] = blk["d"]


def _q4_0(blk, values, scale, offset):
    # ggml's byte k = element k | element k + 16 << 4: pallax's layout for g = 32.
    values.view("V16")[:, 0] = blk["qs"]
    scale[:, 0] = blk["d"]
    np.multiply(scale, np.float32(-8.0), out=offset)


def _q4_1(blk, values, scale, offset):
    values.view("V16")[:, 0] = blk["qs"]
    scale[:, 0] = blk["d"]
    offset[:, 0] = blk["m"]


def _q5_0(blk, values, scale, offset):
    first, second = _q5_values(blk)
    _put(values, [first - np.uint8(16), second - np.uint8(16)])  # int8 bytes of q - 16
    scale[:, 0] = blk["d"]


def _q5_1(blk, values, scale, offset):
    _put(values, list(_q5_values(blk)))
    scale[:, 0] = blk["d"]
    offset[:, 0] = blk["m"]


def _q4_k(blk, values, scale, offset):
    _k_scales(blk, scale, offset)
    # qs is 4 chunks of 32 bytes: byte b of chunk c holds element b of sub-block 2c in
    # its low nibble and element b of sub-block 2c + 1 in its high one. Re-pack each
    # sub-block as byte k = element k | element k + 16 << 4 (16-byte halves of a chunk).
    subs = []
    for c in range(4):
        first, second = _rows(blk["qs"][:, 2 * c]), _rows(blk["qs"][:, 2 * c + 1])
        subs.append((first & np.uint8(0x0F)) | (second << np.uint8(4)))
        subs.append((first >> np.uint8(4)) | (second & np.uint8(0xF0)))
    _put(values, subs)


def _q5_k(blk, values, scale, offset):
    _k_scales(blk, scale, offset)
    qh = _rows(blk["qh"])  # [n, 32]: bit j of byte k is sub-block j's element k's fifth bit
    subs = []
    for c in range(4):  # chunk c: sub-block 2c in the low nibbles, 2c + 1 in the high
        qs = _rows(blk["qs"][:, c])
        for j, low in ((2 * c, qs & np.uint8(0x0F)), (2 * c + 1, qs >> np.uint8(4))):
            high = qh << np.uint8(4 - j) if j <= 4 else qh >> np.uint8(j - 4)
            subs.append(low | (high & np.uint8(0x10)))
    _put(values, subs)


def _q6_k(blk, values, scale, offset):
    # Element 128 h + 32 t + k (h < 2, t < 4, k < 32): low 4 bits in ql byte
    # 64 h + 32 (t % 2) + k (low nibble for t < 2), high 2 bits in qh byte 32 h + k at
    # bit 2 t; the value is q - 32.
    subs = []
    for h in range(2):
        qh = _rows(blk["qh"][:, h])
        ql = [_rows(blk["ql"][:, 2 * h]), _rows(blk["ql"][:, 2 * h + 1])]
        for t in range(4):
            low = ql[t % 2] & np.uint8(0x0F) if t < 2 else ql[t % 2] >> np.uint8(4)
            high = qh << np.uint8(4 - 2 * t) if t <= 2 else qh >> np.uint8(2)
            subs.append((low | (high & np.uint8(0x30))) - np.uint8(32))  # int8 bytes
    _put(values, subs)
    np.multiply(blk["d"].astype(np.float32)[:, None], blk["scales"], out=scale, dtype=np.float32)


_TYPES = {  # name -> (block struct, converter, bits, group size, has an offset)
    "Q8_0": (_struct(34, d=("<f2", 0), qs=("V32", 2)), _q8_0, 8, 32, False),
    "Q4_0": (_struct(18, d=("<f2", 0), qs=("V16", 2)), _q4_0, 4, 32, True),
    "Q4_1": (_struct(20, d=("<f2", 0), m=("<f2", 2), qs=("V16", 4)), _q4_1, 4, 32, True),
    "Q5_0": (_struct(22, d=("<f2", 0), qh=("V4", 2), qs=("V16", 6)), _q5_0, 8, 32, False),
    "Q5_1": (
        _struct(24, d=("<f2", 0), m=("<f2", 2), qh=("V4", 4), qs=("V16", 8)),
        _q5_1, 8, 32, True,
    ),
    "Q4_K": (
        _struct(144, d=("<f2", 0), dmin=("<f2", 2), scales=(("V4", 3), 4), qs=(("V16", 8), 16)),
        _q4_k, 4, 32, True,
    ),
    "Q5_K": (
        _struct(
            176, d=("<f2", 0), dmin=("<f2", 2), scales=(("V4", 3), 4), qh=("V32", 16),
            qs=(("V32", 4), 48),
        ),
        _q5_k, 8, 32, True,
    ),
    "Q6_K": (
        _struct(210, ql=(("V32", 4), 0), qh=(("V32", 2), 128), scales=(("i1", 16), 192),
                d=("<f2", 208)),
        _q6_k, 8, 16, False,
    ),
}  # fmt: skip
