"""H2O decode attention Pallas kernels: interpret mode against the jnp reference, tpu/cuda
export, and the kernel as the tpu/cuda decode lowering of the attention op for every
storage format x slot policy without a kernel of its own (the policy as slot positions).

Every candidate the query does not see (an empty slot, kpos = -1; a position after the
query; one before its sliding window) holds NaN keys and values, so any read of them
that reaches the output or the mass (out of bounds, a mask applied by multiplication)
fails the test.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import pallax  # noqa: F401  (registers the lowerings)
from pallax.ir import primitives as ops
from pallax.ir.kvcache import (
    DENSE,
    FULL,
    H2O,
    Dense,
    Int8,
    Kivi,
    Sinks,
    core,
    layer_parts,
    part_names,
)
from pallax.pallas_kernels.h2o_attention import (
    BlockSizes,
    h2o_decode_attention,
    h2o_decode_attention_reference,
    kernel_supports,
)
from pallax.pallas_kernels.h2o_attention.gpu import TRITON_CUSTOM_CALL

F32, BF16 = jnp.float32, jnp.bfloat16
# atol = BASE_TOL * sqrt(S) and rtol = BASE_TOL, by the output's dtype: ``out`` is in q's
# dtype (kernel and reference each round their float32 result once), the mass is float32
# whatever the inputs (bfloat16 products are exact in float32 on both sides).
BASE_TOL = {jnp.dtype(F32): 1e-6, jnp.dtype(BF16): 2e-3}
KERNEL = 'name = "h2o_decode_attention"'  # Mosaic's kernel_name / Triton's name
LOWERED = {"tpu": "@tpu_custom_call", "cuda": "@" + TRITON_CUSTOM_CALL}
# The Triton custom call has no jax.export compatibility guarantee (see gpu.py).
DISABLED_CHECKS = [export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]


@functools.cache
def _normal_pool():
    # One seeded draw sliced for every case: a threefry compile per shape would dominate.
    return np.asarray(jax.random.normal(jax.random.key(0), (1 << 19,), jnp.float32))


def _draw(shape, start):
    return _normal_pool()[start : start + math.prod(shape)].reshape(shape)


def _seen(kpos, qpos, window):
    qp = np.asarray(qpos)[:, None, None]
    seen = (kpos >= 0) & (kpos <= qp)
    if window is not None:
        seen &= kpos > qp - window
    return seen


def _inputs(shape, q_dtype, kv_dtype, qpos, empty_rows, window):
    """Random candidates: about a quarter empty, some after the query, the last one the
    query's own token; rows in ``empty_rows`` have no candidate at all. Unseen: NaN."""
    batch, num_heads, num_kv_heads, seq_len, head_dim = shape
    rng = np.random.default_rng(0)
    qpos = np.asarray(qpos, np.int32)
    kpos = np.stack([rng.integers(-1, p + 4, size=(num_kv_heads, seq_len)) for p in qpos])
    kpos[rng.random(kpos.shape) < 0.25] = -1
    kpos[:, :, -1] = qpos[:, None]
    kpos[list(empty_rows)] = -1
    kpos = kpos.astype(np.int32)
    kv_shape = (batch, num_kv_heads, seq_len, head_dim)
    unseen = ~_seen(kpos, qpos, window)[..., None]
    keys = np.where(unseen, np.nan, _draw(kv_shape, 1 << 16))
    vals = np.where(unseen, np.nan, _draw(kv_shape, 1 << 18))
    q = _draw((batch, num_heads, head_dim), 0)
    return (
        jnp.asarray(q, q_dtype), jnp.asarray(keys, kv_dtype), jnp.asarray(vals, kv_dtype),
        jnp.asarray(kpos), jnp.asarray(qpos),
    )  # fmt: skip


def _check(case, *, platform, interpret=True):
    shape, q_dtype, kv_dtype, qpos, empty_rows, window, softcap, block_sizes = case
    q, keys, vals, kpos, qpos = _inputs(shape, q_dtype, kv_dtype, qpos, empty_rows, window)
    kwargs = dict(scale=shape[-1] ** -0.5, sliding_window=window, softcap=softcap)
    kernel = functools.partial(
        h2o_decode_attention, block_sizes=block_sizes, interpret=interpret, platform=platform
    )
    out, mass = jax.jit(functools.partial(kernel, **kwargs))(q, keys, vals, kpos, qpos)
    want_out, want_mass = jax.jit(functools.partial(h2o_decode_attention_reference, **kwargs))(
        q, keys, vals, kpos, qpos
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert mass.shape == kpos.shape and mass.dtype == F32
    assert bool(jnp.isfinite(want_out.astype(F32)).all()) and bool(jnp.isfinite(want_mass).all())
    seq_len = keys.shape[2]
    for got, want in ((out, want_out), (mass, want_mass)):
        base = BASE_TOL[jnp.dtype(got.dtype)]
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32),
            atol=base * math.sqrt(seq_len), rtol=base,
        )  # fmt: skip
    # Each query head's probabilities sum to 1: a kv head's mass sums to N / K, or to 0
    # (and the output is 0) when the row sees no candidate.
    group = shape[1] // shape[2]
    any_seen = _seen(np.asarray(kpos), np.asarray(qpos), window).any(-1)  # [B, K]
    np.testing.assert_allclose(np.asarray(mass).sum(-1), group * any_seen, rtol=1e-5, atol=1e-5)
    for b in empty_rows:
        assert not np.asarray(out[b], np.float32).any()


CASE_FIELDS = "shape, q_dtype, kv_dtype, qpos, empty_rows, window, softcap, block_sizes"
# shape is (B, N, K, S, H); G = N // K query heads share a kv head; S = budget + 1.
TPU_CASES = [
    pytest.param(
        (2, 4, 4, 257, 64), F32, F32, [300, 40], [], None, None, None,
        id="mha-s257-h64-f32",
    ),
    pytest.param(
        (3, 6, 2, 200, 128), BF16, BF16, [250, 60, 199], [1], 64, 20.0, None,
        id="gqa3-s200-h128-window-softcap-empty-row-bf16",
    ),
    pytest.param(
        (2, 3, 1, 129, 128), F32, BF16, [150, 90], [], 100, 30.0, None,
        id="gqa3-s129-f32-q-bf16-cache-window-softcap",
    ),
]  # fmt: skip
GPU_CASES = [
    pytest.param(
        (2, 4, 4, 257, 64), F32, F32, [300, 40], [], None, None, BlockSizes(block_s=64),
        id="mha-s257-partial-last-block-f32",
    ),
    pytest.param(
        (3, 6, 2, 200, 128), BF16, BF16, [250, 60, 199], [1], 64, 20.0, BlockSizes(block_s=32),
        id="gqa3-s200-h128-window-softcap-empty-row-bf16",
    ),
    pytest.param(
        (2, 3, 1, 129, 128), F32, BF16, [150, 90], [], 100, 30.0, None,
        id="gqa3-s129-f32-q-bf16-cache-default-blocks",
    ),
]  # fmt: skip


class TestH2ODecodeAttentionInterpret:
    INTERPRET = True

    @pytest.mark.parametrize(CASE_FIELDS, TPU_CASES)
    def test_tpu_kernel_matches_reference(
        self, shape, q_dtype, kv_dtype, qpos, empty_rows, window, softcap, block_sizes
    ):
        case = (shape, q_dtype, kv_dtype, qpos, empty_rows, window, softcap, block_sizes)
        _check(case, platform="tpu", interpret=self.INTERPRET)

    @pytest.mark.parametrize(CASE_FIELDS, GPU_CASES)
    def test_gpu_kernel_matches_reference(
        self, shape, q_dtype, kv_dtype, qpos, empty_rows, window, softcap, block_sizes
    ):
        case = (shape, q_dtype, kv_dtype, qpos, empty_rows, window, softcap, block_sizes)
        _check(case, platform="cuda", interpret=self.INTERPRET)


def _specs(batch, num_heads, num_kv_heads, seq_len, head_dim, dtype):
    kv = jax.ShapeDtypeStruct((batch, num_kv_heads, seq_len, head_dim), dtype)
    return (
        jax.ShapeDtypeStruct((batch, num_heads, head_dim), dtype), kv, kv,
        jax.ShapeDtypeStruct((batch, num_kv_heads, seq_len), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
    )  # fmt: skip


def _export(platform, specs, **kwargs):
    fn = jax.jit(functools.partial(h2o_decode_attention, scale=0.125, platform=platform, **kwargs))
    exported = export.export(fn, platforms=[platform], disabled_checks=DISABLED_CHECKS)
    return exported(*specs).mlir_module()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("head_dim, dtype", [(128, BF16), (64, F32)], ids=["h128-bf16", "h64-f32"])
def test_export_lowers_to_the_kernel(platform, head_dim, dtype):
    text = _export(
        platform, _specs(2, 8, 2, 257, head_dim, dtype), sliding_window=128, softcap=50.0
    )
    assert text.count(LOWERED[platform]) == 1
    assert text.count(KERNEL) == 1


@pytest.mark.parametrize(
    "platform, head_dim, dtype, seq_len, block_sizes",
    [
        ("tpu", 128, BF16, 300, BlockSizes(max_s=256)),
        ("cuda", 128, BF16, 2049, None),
        ("cuda", 96, BF16, 129, None),
        ("tpu", 128, jnp.float16, 129, None),
    ],
    ids=["tpu-s-over-max", "cuda-s-over-default-max", "cuda-h96", "tpu-float16"],
)
def test_export_falls_back_to_the_reference(platform, head_dim, dtype, seq_len, block_sizes):
    specs = _specs(2, 4, 2, seq_len, head_dim, dtype)
    assert not kernel_supports(platform, dtype, specs[1], block_sizes or BlockSizes())
    text = _export(platform, specs, block_sizes=block_sizes)
    assert KERNEL not in text and LOWERED[platform] not in text


COMBOS = [
    (fmt, pol)
    for fmt in (Dense(), Int8(), Kivi(4, 32, 32, "float32", 32))
    for pol in (FULL, Sinks(4, 40), H2O(96, 8))
    if not (pol == FULL and isinstance(fmt, Dense | Kivi))  # those have their own kernels
]


def _cache_after_prefill(fmt, pol, batch=3, kv=2, h=64, seq=256, lengths=(100, 7, 60)):
    """One layer's cache after the reference wrote `lengths` random tokens per row."""
    shapes = layer_parts(fmt, pol, kv, h, F32)

    def size(d):
        if isinstance(d, str) and "/" in d:
            return seq // int(d.split("/")[1])
        return {"B": batch, "S": seq}.get(d, d)

    state = {n: jnp.zeros(tuple(size(d) for d in sh), dt) for n, (sh, dt) in shapes.items()}
    t = max(lengths)
    q = jnp.asarray(_draw((batch, t, 6, h), 1 << 17))
    k = jnp.asarray(_draw((batch, t, kv, h), 1 << 18))
    v = jnp.asarray(_draw((batch, t, kv, h), (1 << 18) + (1 << 16)))
    zeros = jnp.zeros((batch,), jnp.int32)
    _, new = jax.jit(functools.partial(
        core.reference, fmt=fmt, policy=pol, rope=(10000.0, 1.0), scale=0.125,
        sliding_window=None, softcap=None,
    ))(q, k, v, zeros, jnp.asarray(lengths, jnp.int32), state)  # fmt: skip
    return new, jnp.asarray(lengths, jnp.int32)


@pytest.mark.parametrize("fmt, pol", COMBOS, ids=lambda x: str(x).split("(")[0])
@pytest.mark.parametrize("platform, window, softcap", [("tpu", None, 50.0), ("cuda", 48, None)])
def test_slot_kernel_rule_matches_the_op_reference(monkeypatch, fmt, pol, platform, window,
                                                   softcap):  # fmt: skip
    """Every format x policy without its own kernel decodes through the slot kernel (run
    here in interpret mode): the policy reaches it as slot positions (sinks: their keys
    rotated back). It equals the op's reference: the same output, the same rows kept,
    the same scores; row 1 pads."""
    from pallax.pallas_kernels import lowerings

    monkeypatch.setattr(
        lowerings, "h2o_decode_attention", functools.partial(h2o_decode_attention, interpret=True)
    )
    state, pos = _cache_after_prefill(fmt, pol)
    b, kv, h = 3, 2, 64
    q = jnp.asarray(_draw((b, 1, 6, h), 0))
    k = jnp.asarray(_draw((b, 1, kv, h), 1 << 12))
    v = jnp.asarray(_draw((b, 1, kv, h), 1 << 13))
    valid = jnp.asarray([1, 0, 1], jnp.int32)
    names = part_names(fmt, pol)
    args = (q, k, v, pos, valid, *(state[n] for n in names))
    params = ops.attention_params(q, fmt, pol, (10000.0, 1.0), 0.125, window, softcap)
    got = jax.jit(functools.partial(lowerings._attention_rule, platform=platform, **params))(*args)
    want = jax.jit(functools.partial(ops.attention_reference, **params))(*args)
    assert len(got) == len(want) == 1 + len(names)
    tol = BASE_TOL[jnp.dtype(F32)] * math.sqrt(400)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=tol, rtol=1e-5)
    for name, g, w in zip(names, got[1:], want[1:], strict=True):
        if name.endswith("score"):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol, rtol=1e-5)
        else:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_attention_op_lowers_to_the_slot_kernel_for_decode_only(platform):
    pol = H2O(128, 16)
    b, n, kv, h = 2, 4, 2, 64
    names = part_names(DENSE, pol)

    def fn(q, k, v, pos, valid, state):
        return ops.attention_p.bind(
            q, k, v, pos, valid, *(state[x] for x in names),
            **ops.attention_params(q, DENSE, pol, None, 0.125, 256, None),
        )  # fmt: skip

    state = {
        name: jax.ShapeDtypeStruct(tuple({"B": b}.get(d, d) for d in sh), BF16 if dt == "bfloat16"
                                   else jnp.dtype(dt))
        for name, (sh, dt) in layer_parts(DENSE, pol, kv, h, BF16).items()
    }  # fmt: skip
    rows = jax.ShapeDtypeStruct((b,), jnp.int32)
    for steps, count in ((1, 1), (4, 0)):  # prefill and chunks use the reference
        q = jax.ShapeDtypeStruct((b, steps, n, h), BF16)
        k = jax.ShapeDtypeStruct((b, steps, kv, h), BF16)
        exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=DISABLED_CHECKS)
        text = exported(q, k, k, rows, rows, state).mlir_module()
        assert text.count(KERNEL) == count, steps
        assert text.count(LOWERED[platform]) == count, steps


def _bad(change):
    q, keys, vals, kpos, qpos = (jnp.zeros(s.shape, s.dtype) for s in _specs(2, 4, 2, 33, 64, F32))
    args = dict(q=q, keys=keys, vals=vals, kpos=kpos, qpos=qpos, scale=1.0, platform="tpu")
    change(args)
    return args


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(q=jnp.zeros((2, 3, 64))), "num_heads=3 must be divisible by"),
        (lambda a: a.update(q=jnp.zeros((2, 4, 128))), "does not match"),
        (lambda a: a.update(vals=jnp.zeros((2, 2, 32, 64))), "vals.shape"),
        (lambda a: a.update(kpos=jnp.zeros((2, 2, 33), jnp.float32)), "kpos"),
        (lambda a: a.update(qpos=jnp.zeros((3,), jnp.int32)), "qpos"),
        (lambda a: a.update(vals=jnp.zeros((2, 2, 33, 64), BF16)), "dtypes differ"),
        (lambda a: a.update(sliding_window=0), "sliding_window=0"),
        (lambda a: a.update(softcap=-1.0), "softcap=-1.0"),
        (lambda a: a.update(platform="cuda", block_sizes=BlockSizes(block_s=48)), "block_s=48"),
    ],
)
def test_rejects_invalid_inputs(change, match):
    args = _bad(change)
    with pytest.raises(ValueError, match=match):
        h2o_decode_attention(**args)
