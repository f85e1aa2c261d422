"""The CPU lowering of fused projections (`linears`, made by `passes/fuse_projections`):
their packed members in one call of the multi-weight kernel (`pallax_qmatmul_multi` in
qmatmul.cc: one parallel region for all of them, each member bit-equal to its own call),
their float members (bfloat16 / float32 weights of a decode step) in one call of
`pallax_float_matmul_multi` (bf16_matmul.cc, the same way), the others by their own
lowerings."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallax import cpu_kernels as kernels
from pallax.ir import primitives as ops
from pallax.ir.primitives.fused import linears_p, parts_of

TARGET_MULTI = "pallax_qmatmul_multi"
TARGET_FLOAT_MULTI = "pallax_float_matmul_multi"


def _multi_member(x, prim, operands, params):
    """Whether a member of a fused `linears` op runs in the multi-weight kernel call: a
    packed weight the kernel would multiply alone (`use_kernel`, by the whole op's rows
    where x is a data shard of it), without LLM.int8 outliers or a row-parallel split
    (those keep `qlinear`'s own lowering)."""
    if prim is not ops.qlinear_p or params["outliers"] or params.get("row_absmax"):
        return False
    scale = operands[1]
    rows = params.get("rows") or math.prod(x.shape[:-1])
    return kernels.use_kernel(rows, params["bits"], params["group_size"], scale.shape[1])


def qmatmul_multi(xs, weights, *, suffix=""):
    """One kernel call for several packed products: xs[i] [R, Ip_i] (zero-padded, as
    `qmatmul_cpu` takes them) against weights[i] = (data, scale, offset or None, bits,
    group_size) -> a float32 [R, O_i] per weight, each bit-equal to its own call."""
    operands, outs = [], []
    for x, (data, scale, offset, _, _) in zip(xs, weights, strict=True):
        operands += [x, data, scale] + ([] if offset is None else [offset])
        outs.append(jax.ShapeDtypeStruct((x.shape[0], data.shape[0]), jnp.float32))
    call = jax.ffi.ffi_call(TARGET_MULTI + suffix, outs)
    attr = lambda k: np.array([w[k] for w in weights], np.int64)  # noqa: E731
    has_offset = np.array([w[2] is not None for w in weights], np.int64)
    return call(*operands, bits=attr(3), group_size=attr(4), offset=has_offset)


def float_matmul_multi(x, weights, *, suffix=""):
    """One kernel call for several float products of one x [R, I]: weights[i] [O_i, I],
    bfloat16 or float32 -> a float32 [R, O_i] per weight, each bit-equal to its own call
    (`bf16_matmul` / `f32_matmul`)."""
    outs = [jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32) for w in weights]
    return jax.ffi.ffi_call(TARGET_FLOAT_MULTI + suffix, outs)(x.astype(jnp.float32), *weights)


def _float_members(x, parts) -> list[int]:
    """The members of a fused op that run in the float multi-weight call: `linear`s whose
    own lowering is the float kernel (`use_float_kernel`)."""
    return [i for i, (p, o, _) in enumerate(parts)
            if p is ops.linear_p and kernels.use_float_kernel(x, o[0])]  # fmt: skip


def linears_cpu_rule(x, *operands, members):
    """A fused `linears` op on CPU: its packed members that the kernel serves in one call
    of it (one parallel region), the others by their own lowerings."""
    parts = parts_of(members, operands)
    multi = [i for i, (p, o, prm) in enumerate(parts) if _multi_member(x, p, o, prm)]
    if len(multi) < 2:
        multi = []
    outs: list = [None] * len(parts)
    lead, d_in = x.shape[:-1], x.shape[-1]
    if multi:
        x2 = x.reshape(math.prod(lead), d_in).astype(jnp.float32)
        padded: dict = {}
        xs, weights = [], []
        for i in multi:
            _, (data, scale, *rest), prm = parts[i]
            width = scale.shape[1] * prm["group_size"]
            if width not in padded:
                padded[width] = jnp.pad(x2, ((0, 0), (0, width - d_in))) if width > d_in else x2
            xs.append(padded[width])
            offset = rest[0] if prm["offset"] else None
            weights.append((data, scale, offset, prm["bits"], prm["group_size"]))
        for i, y in zip(multi, qmatmul_multi(xs, weights), strict=True):
            prm = parts[i][2]
            outs[i] = y.reshape(*lead, y.shape[-1]).astype(prm.get("out_dtype") or x.dtype)
    floats = _float_members(x, parts)
    if len(floats) >= 2:
        x2 = x.reshape(math.prod(lead), d_in)
        ys = float_matmul_multi(x2, [parts[i][1][0] for i in floats])
        for i, y in zip(floats, ys, strict=True):
            outs[i] = y.reshape(*lead, y.shape[-1]).astype(x.dtype)
    for i, (prim, ops_, prm) in enumerate(parts):
        if outs[i] is None:
            outs[i] = prim.bind(x, *ops_, **prm)
    return outs


__all__ = [
    "TARGET_FLOAT_MULTI", "TARGET_MULTI", "float_matmul_multi", "linears_cpu_rule", "linears_p",
    "qmatmul_multi",
]  # fmt: skip
