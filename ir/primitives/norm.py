"""Normalization: `rms_norm`."""

from __future__ import annotations

from jax import lax
from jax.core import ShapedArray

from pallax.ir.primitives.base import F32, _define, row_sum, widen


# ------------------------------------------------------------------------ rms_norm
def rms_norm_reference(x, w, *, eps):
    """x [..., D], w [D] -> x.dtype; statistics in float32."""
    x32 = x.astype(F32)
    var = row_sum(x32 * x32)[..., None] / x.shape[-1]  # batch-invariant (base.row_sum)
    return (x32 * lax.rsqrt(var + eps) * widen(w)).astype(x.dtype)


def _rms_norm_abstract(x, w, *, eps):
    del eps
    if w.shape != (x.shape[-1],):
        raise TypeError(f"rms_norm weight shape {w.shape} does not match x {x.shape}")
    return ShapedArray(x.shape, x.dtype)


rms_norm_p = _define("rms_norm", rms_norm_reference, _rms_norm_abstract)


def rms_norm(x, w, *, eps):
    return rms_norm_p.bind(x, w, eps=float(eps))
