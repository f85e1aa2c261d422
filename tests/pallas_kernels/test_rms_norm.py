"""RMSNorm Pallas kernels: interpret mode against the jnp reference, and tpu/cuda lowering."""

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

from pallax.pallas_kernels.rms_norm import BlockSizes, rms_norm, rms_norm_reference

EPS = 1e-6
# atol = BASE_TOL * sqrt(D), D the length of the reduction; rtol = BASE_TOL.
BASE_TOL = {jnp.dtype(jnp.float32): 1e-6, jnp.dtype(jnp.bfloat16): 2e-3}
# Exported IR marks the kernel as the thing that runs: Mosaic TPU custom calls carry
# `kernel_name`, Mosaic GPU embeds the kernel as a `<name>_mosaic_gpu` symbol.
LOWERED = {
    "tpu": ("@tpu_custom_call", 'kernel_name = "rms_norm"'),
    "cuda": ("@mosaic_gpu", "rms_norm_mosaic_gpu"),
}


def _inputs(shape, dtype):
    # Slices of one seeded draw: a threefry compile per shape would dominate the test time.
    pool = _normal_pool()
    size, num_cols = math.prod(shape), shape[-1]
    x = pool[:size].reshape(shape)
    w = 1.0 + 0.1 * pool[size : size + num_cols]
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


@functools.cache
def _normal_pool():
    return np.asarray(jax.random.normal(jax.random.key(0), (1 << 16,), jnp.float32))


def _assert_matches_reference(out, x, w):
    base = BASE_TOL[jnp.dtype(x.dtype)]
    expected = jax.jit(functools.partial(rms_norm_reference, eps=EPS))(x, w)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_allclose(
        np.asarray(out, np.float32),
        np.asarray(expected, np.float32),
        atol=base * math.sqrt(x.shape[-1]),
        rtol=base,
    )


class TestRmsNormInterpret:
    INTERPRET = True

    @pytest.mark.parametrize(
        "shape, dtype, block_rows",
        [
            ((8, 128), jnp.float32, 8),  # one full block
            ((3, 7, 576), jnp.bfloat16, 8),  # leading dims, 21 rows: partial last block
            ((1, 640), jnp.float32, None),  # a single decode row, default blocks
            ((130, 256), jnp.bfloat16, 64),  # several blocks, partial last block
        ],
    )
    def test_tpu_kernel_matches_reference(self, shape, dtype, block_rows):
        x, w = _inputs(shape, dtype)
        block_sizes = None if block_rows is None else BlockSizes(block_rows)
        kernel = functools.partial(
            rms_norm, eps=EPS, block_sizes=block_sizes, interpret=self.INTERPRET, platform="tpu"
        )
        out = jax.jit(kernel)(x, w)
        _assert_matches_reference(out, x, w)

    @pytest.mark.parametrize(
        "shape, dtype, block_rows",
        [
            ((2, 5, 576), jnp.bfloat16, 4),  # D padded to 640, rows not a multiple of 4
            ((3, 200), jnp.float32, None),  # default blocks, D padded to 256
        ],
    )
    def test_gpu_kernel_matches_reference(self, shape, dtype, block_rows):
        x, w = _inputs(shape, dtype)
        block_sizes = None if block_rows is None else BlockSizes(block_rows)
        kernel = functools.partial(
            rms_norm, eps=EPS, block_sizes=block_sizes, interpret=self.INTERPRET, platform="cuda"
        )
        out = jax.jit(kernel)(x, w)
        _assert_matches_reference(out, x, w)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_export_lowers_to_the_kernel(platform, dtype):
    x, w = _inputs((4, 576), dtype)
    fn = jax.jit(functools.partial(rms_norm, eps=EPS, platform=platform))
    text = export.export(fn, platforms=[platform])(x, w).mlir_module()
    custom_call, kernel_marker = LOWERED[platform]
    assert text.count(custom_call) == 1
    assert text.count(kernel_marker) == 1


def test_one_export_carries_cpu_cuda_and_tpu():
    # How pallax primitives dispatch: one lowering per platform. (A lax.platform_dependent
    # over both kernels cannot export for several platforms: plgpu.kernel refuses that.)
    prim = Primitive("rms_norm_under_test")
    prim.def_abstract_eval(lambda x, w: jax.core.ShapedArray(x.shape, x.dtype))
    rules = {"cpu": functools.partial(rms_norm_reference, eps=EPS)}
    for platform in ("tpu", "cuda"):
        rules[platform] = functools.partial(rms_norm, eps=EPS, platform=platform)
    for platform, rule in rules.items():
        mlir.register_lowering(prim, mlir.lower_fun(rule, multiple_results=False), platform)
    x = jax.ShapeDtypeStruct((4, 576), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((576,), jnp.bfloat16)
    exported = export.export(jax.jit(prim.bind), platforms=["cpu", "cuda", "tpu"])(x, w)
    text = exported.mlir_module()
    for custom_call, kernel_marker in LOWERED.values():
        assert text.count(custom_call) == 1
        assert text.count(kernel_marker) == 1


def test_rejects_mismatched_weight():
    x, w = _inputs((4, 128), jnp.float32)
    with pytest.raises(ValueError, match=r"w.shape=\(64,\)"):
        rms_norm(x, w[:64], eps=EPS, platform="tpu")


def test_rejects_unaligned_tpu_block():
    x, w = _inputs((32, 128), jnp.float32)
    with pytest.raises(ValueError, match="block_rows=12"):
        rms_norm(x, w, eps=EPS, block_sizes=BlockSizes(12), platform="tpu")


def test_rejects_platform_without_kernel():
    x, w = _inputs((4, 128), jnp.float32)
    with pytest.raises(ValueError, match="platform='cpu'"):
        rms_norm(x, w, eps=EPS, platform="cpu")
