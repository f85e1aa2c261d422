"""Decode attention Pallas kernels: interpret mode against the jnp reference, and tpu/cuda lowering.

Cache slots outside each sequence's attended range (past its length, or before
its sliding window) are NaN, so any read of them that reaches the output (out of
bounds, an off-by-one mask, masking by multiplication) fails the test.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.extend.core import Primitive
from jax.interpreters import mlir

from pallax.pallas_kernels.decode_attention import (
    BlockSizes,
    decode_attention,
    decode_attention_reference,
)

# atol = BASE_TOL * sqrt(S), S the length of the softmax reduction; rtol = BASE_TOL.
BASE_TOL = {
    jnp.dtype(jnp.float32): 1e-6,
    jnp.dtype(jnp.bfloat16): 2e-3,
    jnp.dtype(jnp.float16): 5e-4,
}
LOWERED = {
    "tpu": ("@tpu_custom_call", 'kernel_name = "decode_attention"'),
    "cuda": ("@mosaic_gpu", "decode_attention_mosaic_gpu"),
}


@functools.cache
def _normal_pool():
    # One seeded draw sliced for every case: a threefry compile per shape would dominate.
    return np.asarray(jax.random.normal(jax.random.key(0), (1 << 20,), jnp.float32))


def _inputs(batch, num_heads, num_kv_heads, seq_len, head_dim, dtype, lengths, window=None):
    pool = _normal_pool()
    q_size = batch * num_heads * head_dim
    cache_shape = (batch, num_kv_heads, seq_len, head_dim)
    cache_size = math.prod(cache_shape)
    q = pool[:q_size].reshape(batch, num_heads, head_dim)
    k = pool[q_size : q_size + cache_size].reshape(cache_shape)
    v = pool[q_size + cache_size : q_size + 2 * cache_size].reshape(cache_shape)
    lengths = np.asarray(lengths, np.int32)
    pos = np.arange(seq_len)[None, None, :, None]  # [1, 1, S, 1]
    unused = pos >= lengths[:, None, None, None]
    if window is not None:
        unused |= pos < lengths[:, None, None, None] - window
    k = np.where(unused, np.nan, k)
    v = np.where(unused, np.nan, v)
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(lengths)


def _check(shape, dtype, lengths, sliding_window, softcap, block_sizes, *, platform, interpret):
    q, k, v, lengths = _inputs(*shape, dtype, lengths, sliding_window)
    kwargs = dict(scale=shape[-1] ** -0.5, sliding_window=sliding_window, softcap=softcap)
    kernel = functools.partial(
        decode_attention, block_sizes=block_sizes, interpret=interpret, platform=platform
    )
    out = jax.jit(functools.partial(kernel, **kwargs))(q, k, v, lengths)
    expected = jax.jit(functools.partial(decode_attention_reference, **kwargs))(q, k, v, lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(jnp.isfinite(expected).all())
    base = BASE_TOL[jnp.dtype(dtype)]
    np.testing.assert_allclose(
        np.asarray(out, np.float32),
        np.asarray(expected, np.float32),
        atol=base * math.sqrt(k.shape[2]),
        rtol=base,
    )


CASE_FIELDS = "shape, dtype, lengths, sliding_window, softcap, block_sizes"
# shape is (B, N, K, S, H); G = N // K query heads share a kv head.
TPU_CASES = [
    pytest.param(
        (2, 4, 4, 256, 128), jnp.float32, [1, 256], None, None, BlockSizes(128),
        id="mha-len1-and-full",
    ),
    pytest.param(
        (3, 8, 2, 200, 64), jnp.bfloat16, [200, 1, 77], 50, 20.0, BlockSizes(128),
        id="gqa4-partial-last-block-window-softcap",
    ),
    pytest.param(
        (2, 6, 2, 384, 64), jnp.float32, [300, 129], 128, None, BlockSizes(128),
        id="gqa3-window-skips-blocks",
    ),
    pytest.param(
        (2, 2, 1, 100, 128), jnp.bfloat16, [0, 100], None, 30.0, None,
        id="default-block-spans-cache-empty-seq",
    ),
]  # fmt: skip
GPU_CASES = [
    pytest.param(
        (2, 8, 2, 200, 64), jnp.bfloat16, [200, 1], None, 30.0, BlockSizes(64, num_splits=2),
        id="gqa4-partial-last-block-splits-softcap",
    ),
    pytest.param(
        (3, 3, 1, 256, 128), jnp.bfloat16, [256, 100, 17], 64, None, BlockSizes(128, num_splits=1),
        id="gqa3-window-one-split",
    ),
    pytest.param(
        (1, 4, 2, 320, 64), jnp.float16, [250], 100, None, BlockSizes(64),
        id="f16-auto-splits-window",
    ),
]  # fmt: skip


class TestDecodeAttentionInterpret:
    INTERPRET = True

    @pytest.mark.parametrize(CASE_FIELDS, TPU_CASES)
    def test_tpu_kernel_matches_reference(
        self, shape, dtype, lengths, sliding_window, softcap, block_sizes
    ):
        _check(
            shape, dtype, lengths, sliding_window, softcap, block_sizes,
            platform="tpu", interpret=self.INTERPRET,
        )  # fmt: skip

    @pytest.mark.parametrize(CASE_FIELDS, GPU_CASES)
    def test_gpu_kernel_matches_reference(
        self, shape, dtype, lengths, sliding_window, softcap, block_sizes
    ):
        _check(
            shape, dtype, lengths, sliding_window, softcap, block_sizes,
            platform="cuda", interpret=self.INTERPRET,
        )  # fmt: skip


@pytest.mark.parametrize(
    "platform, dtype",
    [("tpu", jnp.float32), ("tpu", jnp.bfloat16), ("cuda", jnp.bfloat16)],
)
def test_export_lowers_to_the_kernel(platform, dtype):
    q = jax.ShapeDtypeStruct((2, 8, 128), dtype)
    k = v = jax.ShapeDtypeStruct((2, 2, 512, 128), dtype)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    fn = jax.jit(
        functools.partial(
            decode_attention, scale=0.125, sliding_window=256, softcap=50.0, platform=platform
        )
    )
    text = export.export(fn, platforms=[platform])(q, k, v, lengths).mlir_module()
    custom_call, kernel_marker = LOWERED[platform]
    assert text.count(custom_call) == 1
    assert text.count(kernel_marker) == 1


def test_one_export_carries_cpu_cuda_and_tpu():
    # How pallax primitives dispatch: one lowering per platform. (A lax.platform_dependent
    # over both kernels cannot export for several platforms: plgpu.kernel refuses that.)
    kwargs = dict(scale=0.125, sliding_window=256, softcap=50.0)
    prim = Primitive("decode_attention_under_test")
    prim.def_abstract_eval(lambda q, *_: jax.core.ShapedArray(q.shape, q.dtype))
    rules = {"cpu": functools.partial(decode_attention_reference, **kwargs)}
    for platform in ("tpu", "cuda"):
        rules[platform] = functools.partial(decode_attention, platform=platform, **kwargs)
    for platform, rule in rules.items():
        mlir.register_lowering(prim, mlir.lower_fun(rule, multiple_results=False), platform)
    q = jax.ShapeDtypeStruct((2, 8, 128), jnp.bfloat16)
    k = v = jax.ShapeDtypeStruct((2, 2, 512, 128), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    exported = export.export(jax.jit(prim.bind), platforms=["cpu", "cuda", "tpu"])(q, k, v, lengths)
    text = exported.mlir_module()
    for custom_call, kernel_marker in LOWERED.values():
        assert text.count(custom_call) == 1
        assert text.count(kernel_marker) == 1


@pytest.mark.parametrize(
    "shape, platform, block_sizes, match",
    [
        ((2, 6, 4, 128, 64), "tpu", None, "num_heads=6 must be divisible by num_kv_heads=4"),
        ((2, 4, 2, 512, 64), "tpu", BlockSizes(100), "block_k=100"),
        ((2, 4, 2, 512, 96), "cuda", None, "head_dim=96"),
        ((2, 4, 2, 256, 256), "cuda", BlockSizes(256), "shared memory"),
    ],
)
def test_rejects_invalid_inputs(shape, platform, block_sizes, match):
    q, k, v, lengths = _inputs(*shape, jnp.bfloat16, [1, 1])
    with pytest.raises(ValueError, match=match):
        decode_attention(q, k, v, lengths, scale=1.0, block_sizes=block_sizes, platform=platform)


def test_gpu_rejects_float32():
    q, k, v, lengths = _inputs(1, 2, 1, 128, 64, jnp.float32, [5])
    with pytest.raises(NotImplementedError, match="float32"):
        decode_attention(q, k, v, lengths, scale=1.0, platform="cuda")


def test_rejects_non_int32_lengths():
    q, k, v, lengths = _inputs(1, 2, 1, 128, 64, jnp.float32, [5])
    with pytest.raises(ValueError, match="lengths"):
        decode_attention(q, k, v, lengths.astype(jnp.float32), scale=1.0, platform="tpu")
