"""Quantized matmul on GPU with Pallas Triton.

One program per (row block, output block, K split). It walks its share of the
data columns in steps of ``block_w``: loads a ``[block_o, block_w]`` tile of
bytes, unpacks the nibbles (int4: two planes, dotted with the two ``x`` planes)
or sign-extends them (int8), gathers each column's group scale and offset (a
handful of values per row, served from L1), dequantizes in registers and
accumulates ``x @ w.T`` with ``tl.dot`` in float32. Splits write partial sums
``[S, R, O]`` that the wrapper adds, so small decode shapes still fill the GPU.
Per channel int8 (one group, no offset) scales the accumulator once instead.

Rows, output features and columns past the array edges are masked, so no array
is padded and any ``O``, ``Ip`` and group size works; the tiles themselves must
be powers of two of at least 16 (Triton's dot). float32 ``x`` dots in IEEE
float32 (no tensor cores): bfloat16 activations are the fast path.

The Triton custom call (``__gpu$xla.gpu.triton``) carries no ``jax.export``
compatibility guarantee: exporting it needs
``export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
_MIN_TILE = 16  # smallest M, N and K of a Triton dot
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # [M, K] x [N, K] -> [M, N]


def check_blocks(block_r: int, block_o: int, block_w: int) -> None:
    """Raise ValueError unless every tile side is a power of two of at least 16."""
    for name, value in (("block_r", block_r), ("block_o", block_o), ("data columns", block_w)):
        if value < _MIN_TILE or value & (value - 1):
            raise ValueError(
                f"{name}={value} must be a power of two >= {_MIN_TILE} on GPU (Triton dot tiles;"
                " for int4 block_k is twice the data columns)"
            )


def _qmatmul_gpu_kernel(
    *refs,
    group_width: int,
    has_offset: bool,
    scale_last: bool,
    block_r: int,
    block_o: int,
    block_w: int,
    steps_per_split: int,
    precision,
):
    num_planes = len(refs) - (4 if has_offset else 3)
    x_refs = refs[:num_planes]  # each [R, W]
    data_ref = refs[num_planes]  # [O, W] int8, or uint8 nibbles
    scale_ref = refs[num_planes + 1]  # [O, G]
    offset_ref = refs[num_planes + 2] if has_offset else None  # [O, G]
    o_ref = refs[-1]  # [S, R, O] float32, one partial sum per split
    num_rows, width = x_refs[0].shape
    num_out = data_ref.shape[0]
    rows = pl.program_id(0) * block_r + jnp.arange(block_r)  # [block_r]
    outs = pl.program_id(1) * block_o + jnp.arange(block_o)  # [block_o]
    split = pl.program_id(2)
    row_ok, out_ok = rows < num_rows, outs < num_out

    def step(i, acc):
        cols = (split * steps_per_split + i) * block_w + jnp.arange(block_w)  # [block_w]
        col_ok = cols < width
        w_ok = out_ok[:, None] & col_ok[None, :]  # [block_o, block_w]
        x_ok = row_ok[:, None] & col_ok[None, :]  # [block_r, block_w]
        w_at = (outs[:, None], cols[None, :])
        d = plgpu.load(data_ref.at[w_at], mask=w_ok, other=0).astype(jnp.int32)
        planes = (d & 15, d >> 4) if num_planes == 2 else (d,)  # uint8 zero-extends
        group_at = (outs[:, None], (cols // group_width)[None, :])
        if not scale_last:
            col_scale = plgpu.load(scale_ref.at[group_at], mask=w_ok, other=0.0)
        if has_offset:
            col_offset = plgpu.load(offset_ref.at[group_at], mask=w_ok, other=0.0)
        for x_ref, values in zip(x_refs, planes, strict=True):
            x = plgpu.load(x_ref.at[rows[:, None], cols[None, :]], mask=x_ok, other=0.0)
            w = values.astype(jnp.float32)  # [block_o, block_w]
            if not scale_last:
                w = w * col_scale
            if has_offset:
                w = w + col_offset
            acc += lax.dot_general(
                x,
                w.astype(x.dtype),
                _CONTRACT_LAST,
                precision=precision,
                preferred_element_type=jnp.float32,
            )  # [block_r, block_o]
        return acc

    acc = lax.fori_loop(0, steps_per_split, step, jnp.zeros((block_r, block_o), jnp.float32))
    if scale_last:
        acc = acc * plgpu.load(scale_ref.at[outs, 0], mask=out_ok, other=0.0)[None, :]
    out_at = (split, rows[:, None], outs[None, :])
    plgpu.store(o_ref.at[out_at], acc, mask=row_ok[:, None] & out_ok[None, :])


def qmatmul_gpu(
    x_planes: tuple[jax.Array, ...],
    data: jax.Array,
    scale: jax.Array,
    offset: jax.Array | None,
    *,
    group_width: int,
    block_r: int,
    block_o: int,
    block_w: int,
    num_splits: int,
    precision=None,
    interpret: bool = False,
) -> jax.Array:
    """``[R, O]`` float32: ``sum_p x_planes[p] @ dequant(plane p of data).T`` as one Triton kernel.

    ``x_planes`` are ``[R, W]`` with ``W = data.shape[1]`` (int4: the first and second
    halves of every group; int8: ``x``); ``group_width`` is a group's width in data
    columns. Inputs are validated by the public wrapper in ``kernel.py``.
    """
    num_rows, width = x_planes[0].shape
    num_out, num_groups = scale.shape
    num_steps = pl.cdiv(width, block_w)
    steps_per_split = pl.cdiv(num_steps, num_splits)
    num_splits = pl.cdiv(num_steps, steps_per_split)  # no split without a step
    has_offset = offset is not None
    operands = (*x_planes, data, scale) + ((offset,) if has_offset else ())
    partial = pl.pallas_call(
        functools.partial(
            _qmatmul_gpu_kernel,
            group_width=group_width,
            has_offset=has_offset,
            scale_last=num_groups == 1 and not has_offset,
            block_r=block_r,
            block_o=block_o,
            block_w=block_w,
            steps_per_split=steps_per_split,
            precision=precision,
        ),
        out_shape=jax.ShapeDtypeStruct((num_splits, num_rows, num_out), jnp.float32),
        grid=(pl.cdiv(num_rows, block_r), pl.cdiv(num_out, block_o), num_splits),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="qmatmul",
    )(*operands)
    return partial[0] if num_splits == 1 else jnp.sum(partial, axis=0)
