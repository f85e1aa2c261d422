"""KIVI decode attention Pallas kernels: interpret mode against the jnp reference, tpu/cuda
export, and the kernels as the tpu/cuda lowering of the attention op over a KIVI x full cache.

Caches come from ``kvcache.core.write`` on random keys and values (one prefill of each
row's length). The kernels then read a copy in which every float entry the query
must not attend to is NaN (scales and zero points of unattended groups or tokens,
stale or unwritten ring slots, ``first`` rows past ``num_quantized``), so any read
of them that reaches the output fails the test; the reference reads the clean cache.
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
from pallax.ir.kvcache import FULL, Kivi, core, layer_parts, part_names, ring_positions
from pallax.pallas_kernels.kivi_attention import (
    BlockSizes,
    kernel_supports,
    kivi_decode_attention,
    kivi_decode_attention_reference,
)
from pallax.pallas_kernels.kivi_attention.gpu import TRITON_CUSTOM_CALL

F32, BF16 = jnp.float32, jnp.bfloat16
# The reference works in float32 throughout. float32 kernels dot at HIGHEST precision;
# bfloat16 kernels round the dequantized keys, values and probabilities to bfloat16.
TOL = {jnp.dtype(F32): 1e-5, jnp.dtype(BF16): 1e-2}
KERNEL = 'name = "kivi_decode_attention"'  # Mosaic's kernel_name / Triton's name
LOWERED = {"tpu": "@tpu_custom_call", "cuda": "@" + TRITON_CUSTOM_CALL}
# The Triton custom call has no jax.export compatibility guarantee (see gpu.py).
DISABLED_CHECKS = [export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]


@functools.cache
def _normal_pool():
    # One seeded draw sliced for every case: a threefry compile per shape would dominate.
    return np.asarray(jax.random.normal(jax.random.key(0), (1 << 20,), jnp.float32))


def _draw(shape, start):
    return _normal_pool()[start : start + math.prod(shape)].reshape(shape)


def _sizes(shape, batch, seq_len):
    def size(d):
        if isinstance(d, int):
            return d
        if d in ("B", "S"):
            return batch if d == "B" else seq_len
        return -(-seq_len // int(d.partition("/")[2]))  # "S/g": ceil

    return tuple(size(d) for d in shape)


@functools.cache
def _write(cfg):
    return jax.jit(lambda st, k, v, pos, valid: core.write(st, k, v, pos, valid, cfg, FULL))


def _cache(batch, num_kv_heads, seq_len, head_dim, cfg, lengths, dtype):
    """One layer's cache after a prefill of ``lengths[b]`` random tokens per row."""
    state = {
        name: jnp.zeros(_sizes(shape, batch, seq_len), dt)
        for name, (shape, dt) in layer_parts(cfg, FULL, num_kv_heads, head_dim, dtype).items()
    }
    steps = max(max(lengths), 1)
    kv_shape = (batch, steps, num_kv_heads, head_dim)
    k = jnp.asarray(_draw(kv_shape, 1 << 18))
    v = jnp.asarray(_draw(kv_shape, 1 << 19))
    zeros = jnp.zeros((batch,), jnp.int32)
    return _write(cfg)(state, k, v, zeros, jnp.asarray(lengths, jnp.int32))


def _poison(state, lengths, cfg, window):
    """A copy with NaN in every float entry the queries at ``lengths - 1`` do not attend."""
    g, f = cfg.group_size, cfg.full_first
    out = {
        name: np.array(a, np.float32 if a.dtype == BF16 else a.dtype) for name, a in state.items()
    }
    seq_len = state["k.data"].shape[2]
    for b, length in enumerate(lengths):
        nq = g * (max(length - cfg.residual, 0) // g)
        lo = 0 if window is None else max(length - window, 0)
        tokens = np.arange(seq_len)
        packed = (tokens >= max(lo, f)) & (tokens < min(nq, seq_len))
        groups = np.array([packed[r * g : (r + 1) * g].any() for r in range(-(-seq_len // g))])
        ring = np.asarray(ring_positions(length, cfg.staging))
        keep = {
            "k.scale": groups, "k.zero": groups, "v.scale": packed, "v.zero": packed,
            "k.res": ring >= max(lo, nq), "v.res": ring >= max(lo, nq),
        }  # fmt: skip
        if f:
            first = np.arange(f)
            keep["k.first"] = keep["v.first"] = (first >= lo) & (first < min(nq, f))
        for name, rows in keep.items():
            out[name][b, :, ~rows] = np.nan
    return {name: jnp.asarray(a, state[name].dtype) for name, a in out.items()}


def _check(case, *, platform, interpret=True, poison=True):
    (batch, num_heads, num_kv_heads, seq_len, head_dim), cfg, lengths = case[:3]
    window, softcap, q_dtype, cache_dtype, block_sizes = case[3:]
    state = _cache(batch, num_kv_heads, seq_len, head_dim, cfg, lengths, cache_dtype)
    q = jnp.asarray(_draw((batch, num_heads, head_dim), 0), q_dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    kwargs = dict(
        bits=cfg.bits, group_size=cfg.group_size, residual=cfg.residual,
        full_first=cfg.full_first, scale=head_dim**-0.5, sliding_window=window, softcap=softcap,
    )  # fmt: skip
    kernel = functools.partial(
        kivi_decode_attention, platform=platform, interpret=interpret, block_sizes=block_sizes
    )
    read = _poison(state, np.asarray(lengths), cfg, window) if poison else state
    out = jax.jit(functools.partial(kernel, **kwargs))(q, read, lengths)
    expected = jax.jit(functools.partial(kivi_decode_attention_reference, **kwargs))(
        q, state, lengths
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(jnp.isfinite(expected.astype(F32)).all())
    tol = TOL[jnp.dtype(q_dtype)]
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(expected, np.float32), atol=tol, rtol=tol
    )


def _cfg(bits, group_size, residual, full_first=0, scale_dtype="float32"):
    return Kivi(bits, group_size, residual, scale_dtype, full_first)


CASE_FIELDS = "shape, cfg, lengths, window, softcap, q_dtype, cache_dtype, block_sizes"
# shape is (B, N, K, S, H); Gq = N // K query heads share a kv head. With L tokens written,
# nq = G * floor((L - R) / G) positions are quantized and the rest sit in a ring of R + G.
TPU_CASES = [
    pytest.param(
        (4, 4, 2, 256, 64), _cfg(2, 32, 32), [0, 20, 75, 256], None, None, F32, F32, None,
        id="bits2-g32-empty-nq0-partial-ring-full-cache",
    ),
    pytest.param(
        (2, 8, 2, 384, 128), _cfg(4, 16, 16), [397, 130], 100, 20.0, BF16, BF16,
        BlockSizes(128), id="bits4-g16-3-blocks-window-skips-blocks-softcap-bf16",
    ),
    pytest.param(
        (2, 2, 1, 256, 128), _cfg(8, 64, 64, 64, "bfloat16"), [100, 250], None, None, F32, BF16,
        None, id="bits8-g64-full-first-bf16-scales-and-ring-f32-q",
    ),
    pytest.param(
        (1, 2, 1, 512, 256), _cfg(2, 128, 0, 128, "bfloat16"), [400], 300, 30.0, BF16, BF16,
        None, id="bits2-g128-h256-no-residual-first-window",
    ),
    pytest.param(
        (2, 4, 1, 512, 128), _cfg(4, 32, 32, 32), [544, 33], 200, None, F32, F32,
        BlockSizes(256), id="bits4-g32-2-blocks-full-first-window-cache-full",
    ),
]  # fmt: skip
GPU_CASES = [
    pytest.param(
        (4, 4, 2, 256, 64), _cfg(2, 32, 32), [0, 20, 75, 256], 50, None, F32, F32,
        BlockSizes(32, num_splits=3), id="bits2-g32-empty-nq0-partial-ring-window-3-splits",
    ),
    pytest.param(
        (2, 8, 2, 384, 128), _cfg(4, 16, 16), [397, 130], 100, 20.0, BF16, BF16,
        BlockSizes(64, num_splits=2), id="bits4-g16-window-softcap-bf16",
    ),
    pytest.param(
        (2, 2, 1, 256, 128), _cfg(8, 64, 64, 64, "bfloat16"), [100, 250], None, None, F32, BF16,
        None, id="bits8-g64-full-first-auto-splits",
    ),
    pytest.param(
        (1, 32, 1, 512, 256), _cfg(2, 128, 0, 128, "bfloat16"), [400], 300, None, BF16, BF16,
        BlockSizes(32, num_splits=4), id="bits2-g128-h256-gq32-first-window",
    ),
]  # fmt: skip


class TestKiviDecodeAttentionInterpret:
    INTERPRET = True

    @pytest.mark.parametrize(CASE_FIELDS, TPU_CASES)
    def test_tpu_kernel_matches_reference(
        self, shape, cfg, lengths, window, softcap, q_dtype, cache_dtype, block_sizes
    ):
        case = (shape, cfg, lengths, window, softcap, q_dtype, cache_dtype, block_sizes)
        _check(case, platform="tpu", interpret=self.INTERPRET)

    @pytest.mark.parametrize(CASE_FIELDS, GPU_CASES)
    def test_gpu_kernel_matches_reference(
        self, shape, cfg, lengths, window, softcap, q_dtype, cache_dtype, block_sizes
    ):
        case = (shape, cfg, lengths, window, softcap, q_dtype, cache_dtype, block_sizes)
        _check(case, platform="cuda", interpret=self.INTERPRET)


def test_head_dim_96_runs_on_tpu_and_falls_back_to_the_reference_on_gpu():
    # H = 96 at 2 bits packs to 24 bytes: not a power of two, below Triton's 16 x 16 tiles.
    case = ((2, 4, 2, 256, 96), _cfg(2, 32, 32), [75, 200], None, None, F32, F32, None)
    _check(case, platform="tpu")
    _check(case, platform="cuda", poison=False)  # the reference (XLA) is not NaN-proof
    state = _cache(1, 1, 64, 96, _cfg(2, 32, 32), [1], F32)
    assert kernel_supports("tpu", F32, state, 2)
    assert not kernel_supports("cuda", F32, state, 2)


def _specs(batch, num_heads, num_kv_heads, seq_len, head_dim, cfg, dtype, steps=None):
    state = {
        name: jax.ShapeDtypeStruct(_sizes(shape, batch, seq_len), jnp.dtype(dt))
        for name, (shape, dt) in layer_parts(cfg, FULL, num_kv_heads, head_dim, dtype).items()
    }
    lead = (batch,) if steps is None else (batch, steps)
    q = jax.ShapeDtypeStruct((*lead, num_heads, head_dim), dtype)
    return q, state, jax.ShapeDtypeStruct((batch,), jnp.int32)


EXPORT_CASES = [
    pytest.param(_cfg(2, 32, 128, 32, "bfloat16"), 128, BF16, id="bits2-g32-h128-first-bf16"),
    pytest.param(_cfg(4, 64, 64), 64, F32, id="bits4-g64-h64-f32"),
    pytest.param(_cfg(8, 128, 128, 128), 256, BF16, id="bits8-g128-h256-first"),
]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("cfg, head_dim, dtype", EXPORT_CASES)
def test_export_lowers_to_the_kernel(platform, cfg, head_dim, dtype):
    q, state, lengths = _specs(2, 8, 2, 4096, head_dim, cfg, dtype)
    fn = jax.jit(
        functools.partial(
            kivi_decode_attention, bits=cfg.bits, group_size=cfg.group_size,
            residual=cfg.residual, full_first=cfg.full_first, scale=0.125,
            sliding_window=1024, softcap=50.0, platform=platform,
        )
    )  # fmt: skip
    exported = export.export(fn, platforms=[platform], disabled_checks=DISABLED_CHECKS)
    text = exported(q, state, lengths).mlir_module()
    assert text.count(LOWERED[platform]) == 1
    assert text.count(KERNEL) == 1


@pytest.mark.parametrize(
    "platform, head_dim, scale_dtype",
    [("cuda", 96, "float32"), ("tpu", 128, "float16"), ("cuda", 128, "float16")],
)
def test_export_falls_back_to_the_reference(platform, head_dim, scale_dtype):
    cfg = _cfg(2, 32, 32, scale_dtype=scale_dtype)
    q, state, lengths = _specs(2, 4, 2, 512, head_dim, cfg, BF16)
    fn = jax.jit(
        functools.partial(
            kivi_decode_attention, bits=2, group_size=32, residual=32, scale=0.125,
            platform=platform,
        )
    )  # fmt: skip
    exported = export.export(fn, platforms=[platform], disabled_checks=DISABLED_CHECKS)
    text = exported(q, state, lengths).mlir_module()
    assert KERNEL not in text and LOWERED[platform] not in text


def _op(cfg, window=None):
    def fn(q, k, v, pos, valid, state):
        outs = ops.attention_p.bind(
            q, k, v, pos, valid, *(state[n] for n in part_names(cfg, FULL)),
            **ops.attention_params(q, cfg, FULL, None, 0.125, window, None),
        )  # fmt: skip
        return outs[0], outs[1:]

    return jax.jit(fn)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kivi_attention_op_lowers_to_the_kernel_for_decode_only(platform):
    cfg = _cfg(2, 32, 64, 32, "bfloat16")
    for steps, count in ((1, 1), (4, 0)):  # prefill and chunks: the reference
        q, state, pos = _specs(2, 4, 2, 512, 64, cfg, BF16, steps)
        k = v = jax.ShapeDtypeStruct((2, steps, 2, 64), BF16)
        exported = export.export(
            _op(cfg, 256), platforms=[platform], disabled_checks=DISABLED_CHECKS
        )
        text = exported(q, k, v, pos, pos, state).mlir_module()
        assert text.count(KERNEL) == count, steps


def test_kivi_attention_rule_writes_then_attends_like_the_op(monkeypatch):
    """The tpu rule run on CPU (kernel in interpret mode) equals the op's reference: the
    token staged, attended with its group not yet quantized (`pending=1`), then the group
    quantized; the state returned in operand order; row 1 is padding."""
    from pallax.pallas_kernels import lowerings

    monkeypatch.setattr(
        lowerings, "kivi_decode_attention", functools.partial(kivi_decode_attention, interpret=True)
    )
    cfg = _cfg(4, 32, 32, 32)
    pos = jnp.asarray([40, 7, 97], jnp.int32)
    valid = jnp.asarray([1, 0, 1], jnp.int32)
    state = _cache(3, 2, 256, 64, cfg, [40, 7, 97], F32)
    q = jnp.asarray(_draw((3, 1, 4, 64), 0), F32)
    k = jnp.asarray(_draw((3, 1, 2, 64), 1 << 12), F32)
    v = jnp.asarray(_draw((3, 1, 2, 64), 1 << 13), F32)
    params = ops.attention_params(q, cfg, FULL, None, 0.125, None, None)
    parts = [state[p] for p in part_names(cfg, FULL)]
    rule = functools.partial(lowerings._attention_rule, platform="tpu", **params)
    got = jax.jit(rule)(q, k, v, pos, valid, *parts)
    want = jax.jit(functools.partial(ops.attention_reference, **params))(
        q, k, v, pos, valid, *parts
    )
    assert len(got) == len(want) == 1 + len(parts)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=1e-5, rtol=1e-5)
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _bad(change):
    cfg = _cfg(2, 32, 32)
    q, state, lengths = _specs(2, 4, 2, 256, 64, cfg, F32)
    args = dict(
        q=jnp.zeros(q.shape, q.dtype),
        state={n: jnp.zeros(a.shape, a.dtype) for n, a in state.items()},
        lengths=jnp.ones(lengths.shape, jnp.int32),
        bits=2, group_size=32, residual=32, scale=1.0, platform="tpu",
    )  # fmt: skip
    change(args)
    return args


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(bits=3), "bits=3 must be one of"),
        (lambda a: a.update(q=jnp.zeros((2, 3, 64))), "num_heads=3 must be divisible by"),
        (lambda a: a.update(q=jnp.zeros((2, 4, 128))), "k.data.shape=.* must be"),
        (lambda a: a.update(lengths=jnp.ones((2,), jnp.float32)), "lengths"),
        (lambda a: a["state"].pop("v.res"), "state has"),
        (lambda a: a.update(full_first=32), "state has"),
        (lambda a: a["state"].update({"k.scale": jnp.zeros((2, 2, 4, 64))}), "k.scale.shape"),
        (lambda a: a["state"].update({"v.zero": jnp.zeros((2, 2, 256, 2), BF16)}), "one dtype"),
        (lambda a: a.update(sliding_window=0), "sliding_window=0"),
        (lambda a: a.update(softcap=-1.0), "softcap=-1.0"),
        (lambda a: a.update(block_sizes=BlockSizes(128)), "block_s=128 must be a multiple of 256"),
        (lambda a: a.update(platform="cuda", block_sizes=BlockSizes(48)), "block_s=48"),
    ],
)
def test_rejects_invalid_inputs(change, match):
    args = _bad(change)
    with pytest.raises(ValueError, match=match):
        kivi_decode_attention(**args)
