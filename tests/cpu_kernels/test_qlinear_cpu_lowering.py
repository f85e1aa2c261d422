"""qlinear's CPU lowering: the FFI kernel for decode-sized rows, XLA for the rest.

Checked in the compiled HLO (which path runs) and against the XLA reference
(`primitives.qlinear_reference`), for every weight kind the passes and the GGUF loader
produce: int4 groups with offsets (partial last group), per-channel int8, int8 groups
(GGUF Q8_0) and LLM.int8() outliers. The kernel quantizes activations per 32-block, so
the bound is relative to the output's rms (measured 0.5-0.7%).
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax import cpu_kernels
from pallax.ir import primitives as ops
from pallax.ir import qformat

quantize = importlib.import_module("pallax.passes.quantize_weights")  # the module, not the pass

pytestmark = pytest.mark.usefixtures("kernel")

REL_RMS_TOL = 0.01


def _qweight(kind, num_out=96, num_in=200, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((num_out, num_in)).astype(np.float32) / np.sqrt(num_in)
    if kind == "int4":
        return qformat.quantize_rtn(w, bits=4, group_size=64)  # 200 = 3 groups + 8
    if kind == "int8_channel":
        return qformat.quantize_rtn(w, bits=8, group_size=None)
    if kind == "int8_groups":
        return qformat.quantize_rtn(w, bits=8, group_size=32)
    raise AssertionError(kind)


def _call(x, qw):
    return jax.jit(lambda x, qw: ops.qlinear(x, qw))(x, qw)


def _hlo(x, qw):
    return jax.jit(lambda x, qw: ops.qlinear(x, qw)).lower(x, qw).as_text()


def _reference(x, qw):
    rest = [a for a in (qw.offset, qw.outlier_idx, qw.outlier_w) if a is not None]
    return ops.qlinear_reference(
        x,
        qw.data,
        qw.scale,
        *rest,
        bits=qw.bits,
        group_size=qw.group_size,
        in_features=qw.in_features,
        offset=qw.offset is not None,
        outliers=qw.outlier_idx is not None,
    )


def _assert_close(out, want):
    out, want = np.asarray(out, np.float64), np.asarray(want, np.float64)
    rms = np.sqrt(np.mean(want**2))
    assert np.sqrt(np.mean((out - want) ** 2)) <= REL_RMS_TOL * rms


@pytest.mark.parametrize("kind", ["int4", "int8_channel", "int8_groups"])
@pytest.mark.parametrize("lead", [(1, 1), (4, 1), (2, 3)])
def test_decode_rows_run_the_kernel(kind, lead):
    qw = _qweight(kind)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((*lead, qw.in_features)), jnp.float32)
    assert "pallax_qmatmul" in _hlo(x, qw)
    out = _call(x, qw)
    assert out.shape == (*lead, qw.data.shape[0]) and out.dtype == jnp.float32
    _assert_close(out, _reference(x, qw))


def test_prefill_rows_run_the_kernel_and_batch_variant_keeps_xla(monkeypatch):
    """Batch-invariant (the default) every row count runs the kernel, whose rows do not
    depend on each other; batch-variant, prefill past MAX_ROWS keeps XLA."""
    qw = _qweight("int4")
    rows = cpu_kernels.MAX_ROWS["int4"] + 1
    x = jnp.ones((1, rows, qw.in_features), jnp.float32)
    assert "pallax_qmatmul" in _hlo(x, qw)
    monkeypatch.setattr(ops.base, "BATCH_INVARIANT", False)
    assert "pallax_qmatmul" not in _hlo(x, qw)


def test_bfloat16_activations_and_outliers():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 256)).astype(np.float32) / 16
    x = rng.standard_normal((3, 256)).astype(np.float32)
    x[:, [5, 77]] *= 40.0  # outlier features
    idx = np.array([5, 77])
    inliers = w.copy()
    inliers[:, idx] = 0.0
    qw = quantize._with_outliers(qformat.quantize_rtn(inliers, bits=8), w, idx)
    xb = jnp.asarray(x, jnp.bfloat16)
    out = _call(xb, qw)
    assert out.dtype == jnp.bfloat16
    _assert_close(out, _reference(xb, qw))
    _assert_close(out, x.astype(np.float32) @ w.T)


def test_disabled_lowers_through_xla(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    qw = _qweight("int4")
    assert "pallax_qmatmul" not in _hlo(jnp.ones((1, qw.in_features)), qw)
