"""Dense projections: `linear` (x @ W.T) and the gated MLP activation `mlp_act`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.core import ShapedArray

from pallax.ir.primitives import base
from pallax.ir.primitives.base import F32, MLP_KINDS, SKINNY_ROWS, _define, _dot_rows, widen


# -------------------------------------------------------------------------- linear
def linear_reference(x, w):
    """x [..., D_in] against w [D_out, D_in] (x @ w.T) -> x.dtype, accumulated in float32.

    Weights are stored output-major, as in the checkpoints: each output is a dot
    product of two contiguous rows, which XLA:CPU runs ~20% faster at batch 1.
    """
    rows = math.prod(x.shape[:-1])
    native = not base.per_token(x) if base.BATCH_INVARIANT else rows > SKINNY_ROWS
    if w.dtype == jnp.bfloat16 and x.dtype == jnp.bfloat16 and native:
        # Prefill (batch-variant: over SKINNY_ROWS rows): XLA:CPU's native bf16 GEMM.
        # Decode: the widened float32 dot of _dot_rows reads the weights faster.
        y = jnp.einsum("...i,oi->...o", x, w, preferred_element_type=F32)
    else:
        y = _dot_rows(x.astype(F32), widen(w), rows)
    return y.astype(x.dtype)


def _linear_abstract(x, w):
    if x.shape[-1] != w.shape[1]:
        raise TypeError(f"linear: x {x.shape} and w {w.shape} [out, in] do not contract")
    return ShapedArray((*x.shape[:-1], w.shape[0]), x.dtype)


linear_p = _define("linear", linear_reference, _linear_abstract)


def linear(x, w):
    return linear_p.bind(x, w)


# ------------------------------------------------------------------------- mlp_act
def mlp_act_reference(gate, up, *, kind):
    """SwiGLU: silu(gate) * up; GeGLU: gelu_tanh(gate) * up. Computed in float32."""
    g = gate.astype(F32)
    if kind == "swiglu":
        act = g * jax.nn.sigmoid(g)
    else:
        act = jax.nn.gelu(g, approximate=True)
    return (act * up.astype(F32)).astype(gate.dtype)


def _mlp_act_abstract(gate, up, *, kind):
    if kind not in MLP_KINDS:
        raise TypeError(f"mlp_act {kind=} not in {MLP_KINDS}")
    if gate.shape != up.shape:
        raise TypeError(f"mlp_act: gate {gate.shape} vs up {up.shape}")
    return ShapedArray(gate.shape, gate.dtype)


mlp_act_p = _define("mlp_act", mlp_act_reference, _mlp_act_abstract)


def mlp_act(gate, up, *, kind):
    return mlp_act_p.bind(gate, up, kind=kind)
