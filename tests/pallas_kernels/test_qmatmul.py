"""Quantized matmul Pallas kernels: interpret mode against the jnp reference, and tpu/cuda lowering.

Weights come from ``qformat.quantize_rtn`` (int4 with offsets, per channel int8) or
are random integers with random scales and offsets (grouped int8 with an offset,
like GGUF's Q5 values 0..31). ``x`` is zero-padded to whole groups as callers do.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallax.ir import qformat
from pallax.pallas_kernels.qmatmul import BlockSizes, qmatmul, qmatmul_reference
from pallax.pallas_kernels.qmatmul import kernel as qmatmul_kernel
from pallax.pallas_kernels.qmatmul.gpu import TRITON_CUSTOM_CALL

# x ~ N(0, 1) and w ~ N(0, 1/I), so y ~ N(0, 1): atol = BASE_TOL * sqrt(Ip), rtol = BASE_TOL.
# bfloat16: the kernels round each dequantized weight tile to bfloat16 for the dot, the
# reference does not; the worst case here uses a quarter of the tolerance.
BASE_TOL = {jnp.dtype(jnp.float32): 1e-6, jnp.dtype(jnp.bfloat16): 2e-3}
# Exported IR marks the kernel as the thing that runs: Mosaic TPU custom calls carry
# `kernel_name`; Triton custom calls carry the kernel's `name` in their backend config.
LOWERED = {
    "tpu": ("@tpu_custom_call", 'kernel_name = "qmatmul"'),
    "cuda": ("@" + TRITON_CUSTOM_CALL, 'name = "qmatmul"'),
}
# The Triton custom call has no jax.export compatibility guarantee (see gpu.py).
DISABLED_CHECKS = [export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]


@functools.cache
def _normal_pool():
    # One seeded draw sliced for every case: a threefry compile per shape would dominate.
    return np.asarray(jax.random.normal(jax.random.key(0), (1 << 17,), jnp.float32))


def _draw(shape, start):
    pool = _normal_pool()
    size = math.prod(shape)
    return pool[start : start + size].reshape(shape)


def _rtn_weight(bits, group_size, num_out, num_in):
    w = _draw((num_out, num_in), 1 << 16) / math.sqrt(num_in)
    return qformat.quantize_rtn(w, bits, group_size)


def _random_int8_with_offset(group_size, num_out, num_in):
    """Values 0..31 with a scale and offset per group (GGUF Q5_1 style)."""
    groups = math.ceil(num_in / group_size)
    values = np.clip(np.rint((_draw((num_out, num_in), 1 << 16) + 3.0) * 5.0), 0, 31)
    values = qformat.pad_columns(values, group_size).astype(np.int8)
    scale = (1.0 + 0.5 * np.abs(_draw((num_out, groups), 3 << 15))) / (16 * math.sqrt(num_in))
    offset = -16.0 * scale * (1.0 + 0.1 * _draw((num_out, groups), 7 << 14))
    return qformat.QuantizedWeight(
        jnp.asarray(values),
        jnp.asarray(scale, jnp.float32),
        jnp.asarray(offset, jnp.float32),
        None,
        None,
        8,
        group_size,
        num_in,
    )


def _weight(kind, group_size, num_out, num_in):
    if kind == "rtn4":
        return _rtn_weight(4, group_size, num_out, num_in)
    if kind == "rtn8":  # symmetric: per channel (group_size None) or per group
        return _rtn_weight(8, group_size, num_out, num_in)
    return _random_int8_with_offset(group_size, num_out, num_in)


def _activations(num_rows, qw, dtype):
    x = np.zeros((num_rows, qw.padded_in), np.float32)
    x[:, : qw.in_features] = _draw((num_rows, qw.in_features), 0)
    return jnp.asarray(x, dtype)


def _assert_matches_reference(out, x, qw):
    base = BASE_TOL[jnp.dtype(x.dtype)]
    reference = functools.partial(qmatmul_reference, bits=qw.bits, group_size=qw.group_size)
    expected = jax.jit(reference)(x, qw.data, qw.scale, qw.offset)
    assert out.shape == (x.shape[0], qw.out_features) and out.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(expected), atol=base * math.sqrt(x.shape[1]), rtol=base
    )


# kind, group_size, O, I, R, x dtype, BlockSizes overrides
CASES = [
    ("rtn4", 32, 40, 80, 3, jnp.float32, {}),  # partial last group: Ip = 96
    ("rtn4", 16, 256, 256, 8, jnp.bfloat16, {"block_o": 128}),  # 2 output blocks
    ("rtn4", 64, 24, 128, 1, jnp.float32, {}),  # one decode row
    ("rtn4", 128, 64, 256, 16, jnp.bfloat16, {}),
    ("rtn4", 16, 16, 4096, 3, jnp.float32, {"block_k": 2048}),  # K steps of 128 groups
    ("rtn4", 32, 48, 96, 20, jnp.float32, {"block_r": 16}),  # 2 row blocks, rows padded
    ("rtn8", None, 48, 96, 5, jnp.float32, {}),  # per channel
    ("rtn8", None, 256, 256, 16, jnp.bfloat16, {"block_o": 128, "block_k": 128}),  # K steps
    ("rtn8", 32, 24, 80, 8, jnp.bfloat16, {}),  # symmetric groups (GGUF Q8_0), partial group
    ("int8_offset", 32, 16, 64, 3, jnp.float32, {}),
    ("int8_offset", 64, 16, 64, 8, jnp.bfloat16, {}),  # one group, with an offset
]
# Triton's tiles are powers of two: the GPU kernel takes its own blocks (absent: defaults).
GPU_BLOCKS = {1: {"block_o": 16, "block_k": 64}, 4: {"block_k": 32, "num_splits": 4}}


def _case_id(case):
    kind, group_size, num_out, num_in, num_rows, dtype, _ = case
    return f"{kind}-g{group_size or 'I'}-O{num_out}-I{num_in}-R{num_rows}-{jnp.dtype(dtype).name}"


class TestQmatmulInterpret:
    INTERPRET = True

    def _run(self, case, platform, blocks):
        kind, group_size, num_out, num_in, num_rows, dtype, _ = case
        qw = _weight(kind, group_size, num_out, num_in)
        x = _activations(num_rows, qw, dtype)
        defaults = BlockSizes.get_default(platform, num_rows=num_rows)
        block_sizes = dataclasses.replace(defaults, **blocks)
        kernel = functools.partial(
            qmatmul,
            bits=qw.bits,
            group_size=qw.group_size,
            block_sizes=block_sizes,
            interpret=self.INTERPRET,
            platform=platform,
        )
        out = jax.jit(kernel)(x, qw.data, qw.scale, qw.offset)
        _assert_matches_reference(out, x, qw)

    @pytest.mark.parametrize("case", CASES, ids=_case_id)
    def test_tpu_kernel_matches_reference(self, case):
        self._run(case, "tpu", case[-1])

    @pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
    def test_gpu_kernel_matches_reference(self, index):
        self._run(CASES[index], "cuda", GPU_BLOCKS.get(index, {}))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize(
    "bits, group_size, has_offset, dtype",
    [(4, 32, True, jnp.bfloat16), (8, 576, False, jnp.float32)],  # int4 g32, int8 per channel
)
def test_export_lowers_to_the_kernel(platform, bits, group_size, has_offset, dtype):
    num_rows, num_in, num_out = 8, 576, 1536  # SmolLM2's gate/up projection
    groups = num_in // group_size
    data_shape = (num_out, num_in // 2) if bits == 4 else (num_out, num_in)
    args = (
        jax.ShapeDtypeStruct((num_rows, num_in), dtype),
        jax.ShapeDtypeStruct(data_shape, jnp.uint8 if bits == 4 else jnp.int8),
        jax.ShapeDtypeStruct((num_out, groups), jnp.float32),
        jax.ShapeDtypeStruct((num_out, groups), jnp.float32) if has_offset else None,
    )
    fn = jax.jit(functools.partial(qmatmul, bits=bits, group_size=group_size, platform=platform))
    exported = export.export(fn, platforms=[platform], disabled_checks=DISABLED_CHECKS)(*args)
    text = exported.mlir_module()
    custom_call, kernel_marker = LOWERED[platform]
    assert text.count(custom_call) == 1
    assert text.count(kernel_marker) == 1
    assert exported.out_avals[0].shape == (num_rows, num_out)


@pytest.mark.parametrize(
    "num_out, block_o, expected",
    [(576, 256, 576), (1536, 256, 256), (192, 256, 192), (640, 256, 128), (2048, 512, 512)],
)
def test_tpu_output_block_divides_or_covers(num_out, block_o, expected):
    assert qmatmul_kernel._tpu_block_o(num_out, block_o) == expected


@pytest.mark.parametrize(
    "num_rows, dtype, block_r, expected",
    [
        (3, jnp.float32, 256, (8, 8)),
        (3, jnp.bfloat16, 256, (16, 16)),
        (300, jnp.float32, 256, (152, 304)),
    ],
)
def test_tpu_row_blocks_are_balanced(num_rows, dtype, block_r, expected):
    assert qmatmul_kernel._tpu_rows(num_rows, dtype, block_r) == expected


@pytest.mark.parametrize(
    "padded_in, groups, group_size, bits, expected",
    [
        (576, 18, 32, 4, 576),  # 18 groups: one K step
        (16384, 512, 32, 4, 4096),  # 128 groups a step
        (16384, 1, 16384, 8, 4096),  # per channel: any multiple of 128 columns
        (576, 1, 576, 8, 576),  # per channel, no multiple of 128 divides 576
    ],
)
def test_tpu_default_k_block(padded_in, groups, group_size, bits, expected):
    assert qmatmul_kernel._tpu_block_k(padded_in, groups, group_size, bits, None) == expected


def _small_weight():
    qw = _rtn_weight(4, 32, 16, 64)
    return qw, _activations(2, qw, jnp.float32)


def test_rejects_unpadded_x():
    qw, x = _small_weight()
    with pytest.raises(ValueError, match=r"padded_in=64"):
        qmatmul(x[:, :60], qw.data, qw.scale, qw.offset, bits=4, group_size=32, platform="tpu")


def test_rejects_data_of_the_wrong_format():
    qw, x = _small_weight()
    with pytest.raises(ValueError, match=r"must be int8\(16, 64\)"):
        qmatmul(x, qw.data, qw.scale, qw.offset, bits=8, group_size=32, platform="tpu")


def test_rejects_unaligned_tpu_k_block():
    qw, x = _small_weight()
    with pytest.raises(ValueError, match="block_k=32"):
        qmatmul(
            x,
            qw.data,
            qw.scale,
            qw.offset,
            bits=4,
            group_size=32,
            block_sizes=BlockSizes(8, 128, block_k=32),
            platform="tpu",
        )


def test_rejects_gpu_block_not_a_power_of_two():
    qw, x = _small_weight()
    with pytest.raises(ValueError, match="block_o=48"):
        qmatmul(
            x,
            qw.data,
            qw.scale,
            qw.offset,
            bits=4,
            group_size=32,
            block_sizes=BlockSizes(16, 48, block_k=64),
            platform="cuda",
        )
