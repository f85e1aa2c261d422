"""Flash prefill attention Pallas kernels: interpret mode against the jnp reference, and
tpu/cuda lowering with the kernel in the module.

Cache slots past each sequence's chunk are NaN, so any read of them that reaches the
output (a key block past the last real query, an off-by-one causal mask, masking by
multiplication) fails the test.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallax.ir import primitives as ops
from pallax.pallas_kernels.flash_attention import (
    BlockSizes,
    flash_attention,
    flash_attention_reference,
)
from pallax.pallas_kernels.flash_attention.gpu import TRITON_CUSTOM_CALL

# atol = BASE_TOL * sqrt(S); rtol = BASE_TOL (as the decode kernel's tests).
BASE_TOL = {jnp.dtype(jnp.float32): 1e-6, jnp.dtype(jnp.bfloat16): 4e-3}
SMALL_TPU = BlockSizes(block_q=16, block_k=128)  # several query and key blocks per case
SMALL_GPU = BlockSizes(block_q=16, block_k=16)


def _inputs(batch, t, num_heads, num_kv_heads, seq_len, head_dim, dtype, pos, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, t, num_heads, head_dim), np.float32)
    k = rng.standard_normal((batch, num_kv_heads, seq_len, head_dim), np.float32)
    v = rng.standard_normal((batch, num_kv_heads, seq_len, head_dim), np.float32)
    pos = np.asarray(pos, np.int32)
    unwritten = np.arange(seq_len)[None, None, :, None] >= (pos + t)[:, None, None, None]
    k, v = np.where(unwritten, np.nan, k), np.where(unwritten, np.nan, v)
    return (*(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(pos))


CASES = [  # (B, T, N, K, S, H), pos, sliding_window, softcap
    ((2, 20, 6, 2, 300, 64), [0, 37], None, None),  # G=3, partial query and key blocks
    ((2, 13, 3, 1, 64, 32), [5, 0], 8, None),  # G=3 under a window, offsets
    ((1, 9, 4, 4, 260, 128), [100], None, 30.0),  # G=1, softcap, a chunk after a cache
    ((2, 48, 4, 1, 300, 64), [200, 3], 40, 50.0),  # G=4 (Gemma 3), window and softcap
    ((3, 33, 8, 1, 129, 16), [96, 0, 50], None, None),  # G=8, ends at the last slot
]


@pytest.mark.parametrize("platform,blocks", [("tpu", SMALL_TPU), ("cuda", SMALL_GPU)])
@pytest.mark.parametrize("shape,pos,window,softcap", CASES)
def test_kernel_matches_reference(platform, blocks, shape, pos, window, softcap):
    q, k, v, p = _inputs(*shape, jnp.float32, pos)
    kw = dict(scale=shape[-1] ** -0.5, sliding_window=window, softcap=softcap)
    out = flash_attention(q, k, v, p, interpret=True, platform=platform, block_sizes=blocks, **kw)
    want = flash_attention_reference(q, k, v, p, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(jnp.isfinite(want).all())
    base = BASE_TOL[jnp.dtype(jnp.float32)]
    np.testing.assert_allclose(np.asarray(out), np.asarray(want),
                               atol=base * math.sqrt(shape[4]), rtol=base)  # fmt: skip


@pytest.mark.parametrize("platform,blocks", [("tpu", SMALL_TPU), ("cuda", SMALL_GPU)])
@pytest.mark.parametrize("per_head", [False, True])
def test_candidates_match_the_dense_cache(platform, blocks, per_head):
    """Keys at explicit positions in any order (a compressed cache's candidates) give what
    the same keys in their slots give; missing keys (-1) hold NaN and never leak."""
    b, t, n, kv, s, h = 2, 21, 6, 2, 200, 32
    q, k, v, p = _inputs(b, t, n, kv, s, h, jnp.float32, [3, 150])
    kw = dict(scale=h**-0.5, sliding_window=60, softcap=None)
    want = flash_attention_reference(q, k, v, p, **kw)
    rng = np.random.default_rng(1)
    order = rng.permutation(s + 37)  # 37 empty candidates among the slots
    kpos = np.where(order < s, order, -1).astype(np.int32)
    src = np.minimum(order, s - 1)
    kc, vc = (np.asarray(x)[:, :, src] for x in (k, v))
    empty = (kpos < 0)[None, None, :, None]
    kc, vc = np.where(empty, np.nan, kc), np.where(empty, np.nan, vc)
    kpos = np.broadcast_to(kpos, (b, kv if per_head else 1, s + 37))
    if per_head:  # kv head 1's candidates in another order
        perm = rng.permutation(s + 37)
        kpos = kpos.copy()
        kpos[:, 1] = kpos[:, 1, perm]
        kc[:, 1], vc[:, 1] = kc[:, 1, perm], vc[:, 1, perm]
    args = (q, jnp.asarray(kc), jnp.asarray(vc), p)
    ref = flash_attention_reference(*args, kpos=jnp.asarray(kpos), **kw)
    out = flash_attention(*args, kpos=jnp.asarray(kpos), interpret=True, platform=platform,
                          block_sizes=blocks, **kw)  # fmt: skip
    np.testing.assert_allclose(np.asarray(ref), np.asarray(want), atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernel_bfloat16_default_blocks(platform):
    shape = (2, 70, 9, 3, 600, 64)  # SmolLM2's heads; default tiles, a window
    q, k, v, p = _inputs(*shape, jnp.bfloat16, [0, 500])
    kw = dict(scale=0.125, sliding_window=100, softcap=None)
    out = flash_attention(q, k, v, p, interpret=True, platform=platform, **kw)
    want = flash_attention_reference(q, k, v, p, **kw)
    base = BASE_TOL[jnp.dtype(jnp.bfloat16)]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                               atol=base * math.sqrt(shape[4]), rtol=base)  # fmt: skip


def test_reference_is_the_models_attention():
    """The kernels' reference is the op's math: attention_core on a finite cache."""
    q, k, v, p = _inputs(2, 24, 6, 2, 64, 32, jnp.float32, [0, 40])
    k, v = jnp.nan_to_num(k), jnp.nan_to_num(v)
    kw = dict(scale=0.2, sliding_window=16, softcap=20.0)
    np.testing.assert_allclose(np.asarray(flash_attention_reference(q, k, v, p, **kw)),
                               np.asarray(ops.attention_core(q, k, v, p, **kw)),
                               atol=2e-6, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_lowers_for_accelerators(platform, dtype):
    specs = [jax.ShapeDtypeStruct(s, dtype) for s in
             [(2, 100, 9, 64), (2, 3, 1024, 64), (2, 3, 1024, 64)]]  # fmt: skip
    specs.append(jax.ShapeDtypeStruct((2,), jnp.int32))
    fn = functools.partial(flash_attention, scale=0.125, sliding_window=512, softcap=30.0,
                           platform=platform)  # fmt: skip
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
    text = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
        *specs).mlir_module()  # fmt: skip
    if platform == "tpu":
        assert text.count('kernel_name = "flash_attention"') == 1
    else:
        assert text.count(TRITON_CUSTOM_CALL) == 1 and 'name = "flash_attention"' in text


@pytest.mark.parametrize(
    "kwargs,shapes,match",
    [
        ({}, ((2, 4, 6, 32), (2, 4, 64, 32)), "divisible"),
        ({}, ((2, 4, 6, 32), (3, 2, 64, 32)), "does not match"),
        ({"sliding_window": 0}, ((2, 4, 6, 32), (2, 2, 64, 32)), "sliding_window"),
        ({"softcap": -1.0}, ((2, 4, 6, 32), (2, 2, 64, 32)), "softcap"),
        ({"block_sizes": BlockSizes(block_q=8, block_k=128)}, ((2, 4, 6, 32), (2, 2, 256, 32)),
         "multiple of 16"),
        ({"block_sizes": BlockSizes(block_q=16, block_k=100)}, ((2, 4, 6, 32), (2, 2, 256, 32)),
         "multiple of 128"),
        ({"platform": "cuda"}, ((2, 4, 6, 48), (2, 2, 64, 48)), "head_dim=48"),
        ({"platform": "cuda", "block_sizes": BlockSizes(block_q=2, block_k=16)},
         ((2, 4, 6, 32), (2, 2, 64, 32)), "block_q=2"),
        ({"kpos": jnp.zeros((2, 3, 64), jnp.int32)}, ((2, 4, 6, 32), (2, 2, 64, 32)), "kpos"),
    ],
)  # fmt: skip
def test_bad_inputs_are_refused(kwargs, shapes, match):
    q = jnp.zeros(shapes[0], jnp.float32)
    k = jnp.zeros(shapes[1], jnp.float32)
    kwargs = {"platform": "tpu", **kwargs}
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, k, jnp.zeros((q.shape[0],), jnp.int32), scale=1.0, interpret=True,
                        **kwargs)  # fmt: skip
