"""Ops over packed (quantized) weights: `qlinear`, `qembed`, and the shared
int8 activation / dequantization helpers their lowerings use."""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.core import ShapedArray

from pallax.ir.primitives import base
from pallax.ir.primitives.base import F32, SKINNY_ROWS, _define, _dot_rows

# ------------------------------------------------------------------------- qlinear
INT8_MAX = 127.0


def quantize_rows(x, absmax=None):
    """Symmetric int8 per row (LLM.int8()'s vector-wise scheme): x ~ q * scale[..., None].
    `absmax` [..., 1], when given, is the rows' absolute maximum (x is a slice of them:
    a tensor-parallel shard of the row, passes/shard.py)."""
    x32 = x.astype(F32)
    if absmax is None:
        absmax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    scale = absmax.astype(F32) / INT8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def _w8a8(x2, q, scale, absmax=None):
    """x2 [R, I] float32 against per-channel int8 q [O, I]: int8 x int8 -> int32 dot."""
    rows = x2.shape[0]
    xq, xs = quantize_rows(x2, absmax)
    if rows == 1:
        xq = jnp.concatenate([xq, jnp.zeros_like(xq)])
    dims = (((1,), (1,)), ((), ()))
    if 4 < rows <= SKINNY_ROWS:
        acc = lax.optimization_barrier(
            lax.dot_general(q, xq, dims, preferred_element_type=jnp.int32)
        ).T
    else:
        acc = lax.dot_general(xq, q, dims, preferred_element_type=jnp.int32)[:rows]
    return acc.astype(F32) * xs * scale.reshape(-1).astype(F32)


def dequantize_groups(data, scale, offset, *, bits, group_size, in_features, padded=False):
    """The float32 matrix [O, I] of a packed weight (see ir/qformat.py); [O, Ip] with
    the padding columns of a partial last group when `padded`."""
    o = data.shape[0]
    if bits == 4:
        d = data.reshape(o, -1, group_size // 2)
        v = jnp.concatenate([d & 15, d >> 4], axis=-1)  # [O, G, g]
    else:
        v = data.reshape(o, -1, group_size)
    f = v.astype(F32) * scale[..., None]
    if offset is not None:
        f = f + offset[..., None]
    f = f.reshape(o, -1)
    return f if padded else f[:, :in_features]


def qlinear_frame(
    matmul,
    x,
    data,
    scale,
    *rest,
    bits,
    group_size,
    in_features,
    offset,
    outliers,
    out_dtype=None,
    row_absmax=False,
    rows=None,
    dense=None,
):
    """The parts of `qlinear` every lowering shares, around a `matmul` that multiplies.

    Flattens x to float32 rows [R, I]; with `outliers`, takes the listed input features
    out (LLM.int8()'s decomposition: they multiply in float32 against `outlier_w`);
    zero-pads x to whole groups [R, G * g] (rather than slicing the weight: a slice
    between a dequantizing fusion and the dot makes XLA:CPU materialize the float
    weight); then `matmul(x2, data, scale, offset_or_None, bits=, group_size=)` gives the
    float32 [R, O] product with the packed weight. With `row_absmax` the last operand is
    the rows' absolute maximum [..., 1] (x is a tensor-parallel slice of its rows), passed
    on as `matmul(..., absmax=)` for per-row activation quantization. `rows`, when set,
    is the row count of the whole op that x is a data-parallel shard of: the lowerings
    choose their method (which changes how activations are quantized) by it, so a shard
    computes what the whole op would (`matmul(..., total_rows=)`). `matmul(..., per_token=)`
    says whether x is a decode step's rows (`base.per_token`): under batch invariance the
    lowerings choose by that instead. `dense(x, w)`, when given, multiplies the outlier
    features (float32 [R, n] @ [O, n].T; default `_dot_rows`).
    """
    rest = list(rest)
    absmax = rest.pop() if row_absmax else None
    off = rest.pop(0) if offset else None
    idx, w_out = (rest[0], rest[1]) if outliers else (None, None)
    lead, d_in = x.shape[:-1], x.shape[-1]
    rows_here = math.prod(lead)
    x2 = x.reshape(rows_here, d_in).astype(F32)
    if idx is not None:
        x_out = jnp.take(x2, idx, axis=1)
        # A [I] mask multiply fuses into the row quantization; a scatter into x would not.
        x2 = x2 * jnp.ones((d_in,), F32).at[idx].set(0.0)
    padded = scale.shape[1] * group_size
    if padded > d_in:
        x2 = jnp.pad(x2, ((0, 0), (0, padded - d_in)))
    kw = {"per_token": base.per_token(x)}
    if absmax is not None:
        kw["absmax"] = absmax.reshape(rows_here, 1)
    if rows is not None:
        kw["total_rows"] = rows
    y = matmul(x2, data, scale, off, bits=bits, group_size=group_size, **kw)
    if idx is not None:
        w_out = w_out.astype(F32)
        y = y + (dense(x_out, w_out) if dense else _dot_rows(x_out, w_out, rows_here))
    return y.reshape(*lead, data.shape[0]).astype(out_dtype or x.dtype)


def qmatmul_xla(
    x2, data, scale, off, *, bits, group_size, absmax=None, total_rows=None, per_token=True
):
    """x2 [R, G * g] float32 against a packed weight -> [R, O] float32, in XLA ops.

    Per-output-channel int8 (LLM.int8()'s vector-wise scheme) runs as W8A8 up to
    SKINNY_ROWS rows (decode): activations are quantized to int8 per row on the fly
    and the dot runs in integers with int32 accumulation. On XLA:CPU the int8 x int8 ->
    int32 dot reads the int8 bytes directly and runs 1.2-1.9x faster than the float32
    dot from 2 rows up. Above that (prefill, score), where the GEMM is compute-bound
    and dequantizing the weight costs little, it is weight-only: one scale per row of
    activations costs SmolLM2 +4.0% perplexity against +0.6% through the CPU kernel's
    per-32 blocks (scripts/eval_ppl.py, --chunk-size 128 vs 64). Group-wise weights
    (int4, or int8 kept from a GGUF file) are unpacked and dequantized inside the
    step, in a fusion that reads the packed bytes, and multiplied in float32. Under
    batch invariance (`base.BATCH_INVARIANT`) W8A8 serves decode steps (`per_token`) and
    the weight-only product prefill, at any row count: both are row-invariant.
    """
    rows = x2.shape[0] if total_rows is None else total_rows
    w8a8 = per_token if base.BATCH_INVARIANT else rows <= SKINNY_ROWS
    if bits == 8 and off is None and scale.shape[1] == 1 and w8a8:
        return _w8a8(x2, data, scale, absmax)
    w = dequantize_groups(
        data, scale, off, bits=bits, group_size=group_size, in_features=x2.shape[1], padded=True
    )
    return _dot_rows(x2, w, x2.shape[0])


def qlinear_reference(x, data, scale, *rest, **params):
    """x [..., I] against a packed weight [O, I] (ir/qformat.py) -> x.dtype (or
    `out_dtype`), in XLA ops: `qlinear_frame` around `qmatmul_xla`.

    This is the lowering on every platform without its own rule. On CPU,
    `pallax.cpu_kernels` registers one that multiplies decode-sized rows in a C++
    kernel and keeps this for the rest.
    """
    return qlinear_frame(qmatmul_xla, x, data, scale, *rest, **params)


def _qlinear_abstract(
    x,
    data,
    scale,
    *rest,
    bits,
    group_size,
    in_features,
    offset,
    outliers,
    out_dtype=None,
    row_absmax=False,
    rows=None,
):
    o = data.shape[0]
    groups = -(-in_features // group_size)
    want = (o, groups * group_size // (2 if bits == 4 else 1))
    if x.shape[-1] != in_features or tuple(data.shape) != want:
        raise TypeError(
            f"qlinear: x {x.shape} and packed int{bits} data {data.shape} (g{group_size}, "
            f"{in_features} in) disagree"
        )
    if data.dtype != (jnp.uint8 if bits == 4 else jnp.int8) or scale.shape != (o, groups):
        raise TypeError(f"qlinear: data {data.dtype} / scale {scale.shape} malformed")
    if len(rest) != int(offset) + 2 * int(outliers) + int(row_absmax):
        raise TypeError(f"qlinear: {len(rest)} extra operands for {offset=} {outliers=}")
    return ShapedArray((*x.shape[:-1], o), jnp.dtype(out_dtype or x.dtype))


qlinear_p = _define("qlinear", qlinear_reference, _qlinear_abstract)
qlinear_p.pallax_semantic = True  # type: ignore[attr-defined]


def qlinear(x, w, *, out_dtype=None):
    """x @ w.T for a `QuantizedWeight` w (ir/qformat.py); out_dtype defaults to x's."""
    rest = [a for a in (w.offset, w.outlier_idx, w.outlier_w) if a is not None]
    return qlinear_p.bind(
        x,
        w.data,
        w.scale,
        *rest,
        bits=w.bits,
        group_size=w.group_size,
        in_features=w.in_features,
        offset=w.offset is not None,
        outliers=w.outlier_idx is not None,
        out_dtype=None if out_dtype is None else jnp.dtype(out_dtype).name,
    )


# -------------------------------------------------------------------------- qembed
def qembed_reference(
    ids, data, scale, *rest, bits, group_size, in_features, offset, scale_by, dtype, outliers=False
):
    """Rows of a packed table [V, D] gathered and dequantized -> [B, T, D] `dtype` (outlier
    columns, when the table has them, put back from their float32 values)."""
    take = functools.partial(jnp.take, indices=ids.reshape(-1), axis=0, mode="clip")
    rest = list(rest)
    off = take(rest.pop(0)) if offset else None
    rows = dequantize_groups(
        take(data), take(scale), off, bits=bits, group_size=group_size, in_features=in_features
    )
    if outliers:
        idx, w_out = rest
        rows = rows.at[:, idx].set(take(w_out).astype(F32))
    if scale_by is None:
        return rows.reshape(*ids.shape, in_features).astype(dtype)
    rows = rows * jnp.asarray(scale_by, F32)
    return base.fence(rows.reshape(*ids.shape, in_features).astype(dtype))


def _qembed_abstract(
    ids, data, scale, *rest, bits, group_size, in_features, offset, scale_by, dtype, outliers=False
):
    return ShapedArray((*ids.shape, in_features), jnp.dtype(dtype))


qembed_p = _define("qembed", qembed_reference, _qembed_abstract)
qembed_p.pallax_semantic = True  # type: ignore[attr-defined]


def qembed(ids, w, *, scale=None, dtype=jnp.float32):
    rest = [a for a in (w.offset, w.outlier_idx, w.outlier_w) if a is not None]
    return qembed_p.bind(
        ids,
        w.data,
        w.scale,
        *rest,
        bits=w.bits,
        group_size=w.group_size,
        in_features=w.in_features,
        offset=w.offset is not None,
        scale_by=None if scale is None else float(scale),
        dtype=jnp.dtype(dtype).name,
        outliers=w.outlier_idx is not None,
    )
