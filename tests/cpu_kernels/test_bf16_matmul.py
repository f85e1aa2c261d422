"""The bfloat16-weight matmul kernel (cpu_kernels/bf16_matmul.cc) and the linear /
lm_head CPU lowerings that use it: exact against a float64 product of the widened
weights, the kernel in the HLO for decode-sized rows only, XLA for the rest."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax import cpu_kernels
from pallax.ir import primitives as ops

pytestmark = pytest.mark.usefixtures("kernel")


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
def test_kernel_matches_the_widened_product(rows, d_in, d_out):
    x, w = _inputs(rows, d_in, d_out, seed=rows + d_in)
    got = np.asarray(jax.jit(cpu_kernels.bf16_matmul)(x, w))
    want = _exact(x, w)
    # float32 accumulation over d_in terms (tokamax-style bound: 5e-7 * sqrt(K) * scale)
    scale = np.abs(np.asarray(x)).max() * np.abs(np.asarray(w, np.float32)).max() * np.sqrt(d_in)
    np.testing.assert_allclose(got, want, atol=5e-7 * np.sqrt(d_in) * scale)


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("lead", [(1, 1), (4, 1), (2, 2)])
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


def test_prefill_rows_float32_weights_and_the_switch_keep_xla(monkeypatch):
    x, w = _inputs(cpu_kernels.BF16_MAX_ROWS + 1, 64, 48)
    assert "pallax_bf16_matmul" not in _hlo(ops.linear, x, w)
    assert "pallax_bf16_matmul" not in _hlo(ops.linear, x[:4], w.astype(jnp.float32))
    monkeypatch.setenv("PALLAX_CPU_KERNELS", "0")
    assert "pallax_bf16_matmul" not in _hlo(ops.linear, x[:4], w)


def test_bad_shapes_are_named():
    x, w = _inputs(2, 64, 48)
    with pytest.raises(ValueError, match=r"bf16_matmul: x \(2, 64\) and w float32\(48, 64\)"):
        cpu_kernels.bf16_matmul(x, w.astype(jnp.float32))
