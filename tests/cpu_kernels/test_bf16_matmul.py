"""The float-weight matmul kernels (cpu_kernels/bf16_matmul.cc: bfloat16 and float32
weights) and the linear / lm_head CPU lowerings that use them: exact against a float64
product of the widened weights, every row's bits the same whatever rows share the call,
the kernel in the HLO for decode steps (one token per sequence) only, XLA for prefill."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax import cpu_kernels
from pallax.ir import primitives as ops

pytestmark = pytest.mark.usefixtures("kernel")
F32 = jnp.float32


def _inputs(rows, d_in, d_out, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((rows, d_in)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d_out, d_in)) / np.sqrt(d_in), jnp.bfloat16)
    return x, w


def _exact(x, w):
    return np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64).T


# rows 1 (the streaming path) and 2..64 (3 x 4 tiles with every remainder); input
# features not a multiple of 8 or 32 (the scalar tails); outputs not a multiple of 3.
@pytest.mark.parametrize(
    "rows,d_in,d_out",
    [(1, 576, 1536), (1, 37, 10), (2, 64, 3), (3, 200, 7), (5, 576, 64), (8, 1536, 577),
     (13, 9, 5), (64, 96, 11)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kernel_matches_the_widened_product(rows, d_in, d_out, dtype):
    x, w = _inputs(rows, d_in, d_out, seed=rows + d_in)
    fn = cpu_kernels.bf16_matmul if dtype == "bfloat16" else cpu_kernels.f32_matmul
    w = w.astype(dtype)
    got = np.asarray(jax.jit(fn)(x, w))
    want = _exact(x, w)
    # float32 accumulation over d_in terms (tokamax-style bound: 5e-7 * sqrt(K) * scale)
    scale = np.abs(np.asarray(x)).max() * np.abs(np.asarray(w, np.float32)).max() * np.sqrt(d_in)
    np.testing.assert_allclose(got, want, atol=5e-7 * np.sqrt(d_in) * scale)


def _hlo(fn, *args):  # a new function each time: jit's cache would keep an old lowering
    return jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


@pytest.mark.parametrize("lead", [(1, 1), (4, 1), (9, 1)])
def test_decode_sized_linear_and_lm_head_run_the_kernel(lead):
    x, w = _inputs(int(np.prod(lead)), 64, 48)
    x = x.reshape(*lead, 64)
    assert "pallax_bf16_matmul" in _hlo(ops.linear, x, w)
    assert "pallax_bf16_matmul" in _hlo(lambda x, t: ops.lm_head(x, t, softcap=30.0), x, w)
    np.testing.assert_allclose(
        jax.jit(ops.linear)(x, w), ops.linear_reference(x, w), rtol=1e-5, atol=1e-5
    )
    got = jax.jit(lambda x, t: ops.lm_head(x, t, softcap=30.0))(x, w)
    np.testing.assert_allclose(got, ops.lm_head_reference(x, w, softcap=30.0), rtol=1e-5, atol=1e-5)
    # bfloat16 activations are widened on the way in and the output keeps their dtype
    xb = x.astype(jnp.bfloat16)
    assert jax.jit(ops.linear)(xb, w).dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_every_row_has_the_same_bits_whatever_its_batch(dtype):
    """Batch invariance: a row alone, at every tile position and with every remainder of
    rows beside it, comes out bit for bit the same (one reduction order per output)."""
    x, w = _inputs(70, 200, 29, seed=3)
    w = w.astype(dtype)
    fn = jax.jit(cpu_kernels.bf16_matmul if dtype == "bfloat16" else cpu_kernels.f32_matmul)
    alone = np.concatenate([np.asarray(fn(x[i : i + 1], w)) for i in range(70)])
    for rows in (2, 3, 4, 5, 7, 8, 13, 64, 70):
        np.testing.assert_array_equal(np.asarray(fn(x[:rows], w)), alone[:rows])


@pytest.mark.parametrize("rows", [1, 5, 70])
def test_multi_weight_call_is_each_weights_own_call(rows):
    """One `float_matmul_multi` call (fused projections of a decode step) over bfloat16
    and float32 weights of different widths (one not a multiple of the 12-row tiles, one
    empty) gives each weight the bits of its own call, in one custom call."""
    x, _ = _inputs(rows, 200, 1, seed=rows)
    shapes = [(577, "bfloat16"), (64, "float32"), (29, "bfloat16"), (0, "bfloat16"),
              (130, "float32")]  # fmt: skip
    ws = [_inputs(1, 200, o, seed=o)[1].astype(dt) for o, dt in shapes]
    got = jax.jit(cpu_kernels.float_matmul_multi)(x, ws)
    for y, w in zip(got, ws, strict=True):
        own = cpu_kernels.bf16_matmul if w.dtype == jnp.bfloat16 else cpu_kernels.f32_matmul
        assert y.shape == (rows, w.shape[0]) and y.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(own)(x, w)))
    assert _hlo(cpu_kernels.float_matmul_multi, x, ws).count("stablehlo.custom_call") == 1


def test_prefill_keeps_xla_and_decode_runs_the_kernel(monkeypatch):
    x, w = _inputs(64, 64, 48)
    prefill = x.reshape(4, 16, 64)  # one prompt chunk of 16 tokens per sequence
    assert "pallax_bf16_matmul" not in _hlo(ops.linear, prefill, w)
    assert "pallax_f32_matmul" not in _hlo(ops.linear, prefill, w.astype(jnp.float32))
    decode = x.reshape(64, 1, 64)  # a decode step at batch 64
    assert "pallax_bf16_matmul" in _hlo(ops.linear, decode, w)
    assert "pallax_f32_matmul" in _hlo(ops.linear, decode, w.astype(jnp.float32))
    monkeypatch.setattr(ops.base, "BATCH_INVARIANT", False)  # the old row-count rule
    assert "pallax_bf16_matmul" not in _hlo(ops.linear, x[:5].reshape(5, 1, 64), w)
    assert "pallax_f32_matmul" not in _hlo(ops.linear, x[:1].reshape(1, 1, 64), w.astype(F32))
    monkeypatch.setenv("PALLAX_CPU_KERNELS", "0")
    monkeypatch.setattr(ops.base, "BATCH_INVARIANT", True)
    assert "pallax_bf16_matmul" not in _hlo(ops.linear, x[:4].reshape(4, 1, 64), w)


def test_bad_shapes_are_named():
    x, w = _inputs(2, 64, 48)
    with pytest.raises(ValueError, match=r"bf16_matmul: x \(2, 64\) and w float32\(48, 64\)"):
        cpu_kernels.bf16_matmul(x, w.astype(jnp.float32))
