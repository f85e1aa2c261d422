"""Quantized matmul as a Pallas kernel: Mosaic TPU (this file) and Triton GPU (``gpu.py``).

``y = x @ w.T`` with ``w`` [O, I] in pallax's packed format (``ir/qformat.py``):
int8 or nibble-packed int4 values with a float32 scale (and optional offset) per
output feature and group of ``g`` input features. The weight is dequantized in
VMEM, never in HBM, and products accumulate in float32.

int4 bytes hold the two halves of their group (low nibble: the first ``g/2``
features, high nibble: the last), so the wrapper splits ``x`` the same way, into
two planes ``[R, Ip/2]``, and the kernel dots each plane with one nibble of the
bytes: no interleaving in the kernel. int8 has one plane, ``x`` itself.

TPU grid: (row block, output block, K block), the K axis accumulating into the
resident float32 output block. Per-group scales are spread across their ``g``
columns by a matmul with a 0/1 matrix built from iotas (Mosaic has no cheap
reshape that splits the lane axis), the weight tile is scaled and dotted, and
offsets add ``xsum @ offset.T`` with ``xsum`` [R, G] the sum of ``x`` over each
group (int4 dots ``value - 8`` and adds ``8 * scale`` to the offset, which halves
the bfloat16 rounding of the tile). With one group per row (per channel) scale
and offset apply to the output block once, after the last K step.

TPU blocks: ``x`` planes ``[block_r, block_k']``, data ``[block_o, block_k']``
(``block_k' = block_k / 2`` for int4), per-group arrays ``[block_o, block_k / g]``.
``block_o`` is a multiple of 128 dividing ``O`` or all of ``O`` (576 and 192 have
no such divisor); ``block_k`` is all of ``Ip`` unless a multiple of 128 groups
divides ``G`` (so the per-group blocks stay lane-aligned), or, with one group, a
multiple of 128 data columns.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallax.pallas_kernels.platforms import resolve_platform
from pallax.pallas_kernels.qmatmul import gpu

SUPPORTED_BITS = (4, 8)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_TPU_LANES = 128
_TPU_MAX_BLOCK_K = 4096  # input features per step when the choice is free
_TPU_MAX_TILE = 256 * 1024  # data elements per block: float32 temporaries of 1 MiB each
_TARGET_GPU_PROGRAMS = 2 * 132  # two per SM on an H100 SXM
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # [M, K] x [N, K] -> [M, N]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the ``[R, O]`` output and of the ``Ip`` input features.

    block_r: rows per block. TPU: at most this many, a multiple of 8 (16 for
      bfloat16 ``x``) when it does not cover every row; rows are zero-padded to
      equal blocks. GPU: a power of two, at least 16 (the Triton dot tile); rows
      past ``R`` are masked.
    block_o: output features per block, an upper bound. TPU: the largest multiple of
      128 up to it that divides ``O``, else all of ``O``. GPU: a power of two, at
      least 16; features past ``O`` are masked.
    block_k: input features per step. TPU: None picks the largest legal width up to
      4096 (see the module docstring). GPU: a power of two, at least 16 data columns
      (32 features for int4); columns past ``Ip`` are masked.
    num_splits: GPU only, split-K: programs that share one output block, each
      walking a slice of the K steps; their partial sums are added afterwards. None
      picks enough to fill the GPU when ``R`` and ``O`` give few blocks.
    """

    block_r: int
    block_o: int
    block_k: int | None = None
    num_splits: int | None = None

    def __post_init__(self):
        for name in ("block_r", "block_o", "block_k", "num_splits"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be positive")

    @classmethod
    def get_default(cls, platform: str = "tpu", *, num_rows: int = 1) -> BlockSizes:
        if platform == "tpu":
            # 256 x 256 float32 output blocks; the K width is picked per shape (block_k None).
            return cls(block_r=256, block_o=256)
        # GPU: one 16-row dot tile for decode, 64 x 64 tiles for longer inputs.
        return cls(block_r=16 if num_rows <= 16 else 64, block_o=64, block_k=256)


# ------------------------------------------------------------------------------ TPU
def _qmatmul_kernel(*refs, bits, group_width, one_group, has_offset, precision):
    """One (row, output, K) block: dequantize the weight tile and accumulate into ``o_ref``."""
    num_planes = 2 if bits == 4 else 1
    x_refs = refs[:num_planes]  # each [block_r, block_w]
    data_ref, scale_ref = refs[num_planes : num_planes + 2]  # [block_o, block_w] int8
    offset_ref, xsum_ref = refs[num_planes + 2 : -1] if has_offset else (None, None)
    o_ref = refs[-1]  # [block_r, block_o] float32, resident across the K axis
    # scale_ref, offset_ref: [block_o, block_g], or [1, block_o] with one group.
    # xsum_ref: [block_r, block_g], sums of x over each group.
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        o_ref[...] = jnp.zeros_like(o_ref)

    d = data_ref[...].astype(jnp.int32)  # [block_o, block_w]
    planes = (d & 15, (d >> 4) & 15) if bits == 4 else (d,)
    # int4 with an offset dots value - 8 and adds 8 * scale to the offset: w = v * s + z is
    # (v - 8) * s + (z + 8 * s), and |v - 8| <= 8 halves what bfloat16 rounding of the tile loses.
    center = 8 if bits == 4 and has_offset else 0
    planes = tuple(p - center for p in planes) if center else planes
    if not one_group:
        col_scale = _spread_groups(scale_ref[...], group_width, d.shape[1])  # [block_o, block_w]
    acc = o_ref[...]
    for x_ref, values in zip(x_refs, planes, strict=True):
        x = x_ref[...]
        w = values.astype(jnp.float32)
        if not one_group:
            w = w * col_scale
        acc += lax.dot_general(
            x,
            w.astype(x.dtype),
            _CONTRACT_LAST,
            precision=precision,
            preferred_element_type=jnp.float32,
        )  # [block_r, block_o]
    if has_offset and not one_group:
        acc += lax.dot_general(
            xsum_ref[...],
            offset_ref[...] + center * scale_ref[...],  # [block_o, block_g]
            _CONTRACT_LAST,
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
    o_ref[...] = acc

    if one_group:

        @pl.when(k == pl.num_programs(2) - 1)
        def _scale_output():
            out = o_ref[...] * scale_ref[...]  # [block_r, block_o] * [1, block_o]
            if has_offset:
                offset = offset_ref[...] + center * scale_ref[...]  # [1, block_o]
                out += xsum_ref[...] * offset  # [block_r, 1] * [1, block_o]
            o_ref[...] = out


def _spread_groups(per_group, group_width, num_cols):
    """``[N, n_groups]`` -> ``[N, num_cols]``, column ``j`` taking group ``j // group_width``.

    A matmul with a 0/1 matrix: exact (one nonzero term per output at float32
    precision) and free of lane-splitting reshapes.
    """
    shape = (per_group.shape[1], num_cols)
    col = lax.broadcasted_iota(jnp.int32, shape, 1)
    start = lax.broadcasted_iota(jnp.int32, shape, 0) * group_width
    onehot = jnp.where((col >= start) & (col < start + group_width), 1.0, 0.0)  # [n_groups, cols]
    return jnp.dot(
        per_group, onehot, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def _tpu_block_k(padded_in, num_groups, group_size, bits, block_k):
    """Input features per K step: widths whose x, data and per-group blocks Mosaic accepts."""
    features_per_col = 2 if bits == 4 else 1
    if num_groups == 1:
        unit = _TPU_LANES * features_per_col  # 128 data columns
    else:
        unit = _TPU_LANES * group_size  # 128 groups: per-group blocks stay lane-aligned

    def legal(width):
        return width == padded_in or (padded_in % width == 0 and width % unit == 0)

    if block_k is not None:
        if not legal(block_k):
            raise ValueError(
                f"{block_k=} must be {padded_in=} or a multiple of {unit} dividing it on TPU"
                f" ({num_groups=}, {group_size=}, {bits=})"
            )
        return block_k
    fits = [w for w in range(unit, _TPU_MAX_BLOCK_K + 1, unit) if legal(w)]
    return max(fits) if fits else padded_in


def _tpu_block_o(num_out, block_o):
    """The largest multiple of 128 up to ``block_o`` dividing ``O``, else all of ``O``."""
    if num_out <= block_o:
        return num_out
    for width in range(block_o // _TPU_LANES * _TPU_LANES, 0, -_TPU_LANES):
        if num_out % width == 0:
            return width
    return num_out


def _qmatmul_tpu(x_planes, data, scale, offset, xsum, *, bits, group_size, block_sizes, interpret):
    num_rows = x_planes[0].shape[0]
    num_out, num_groups = scale.shape
    padded_in = num_groups * group_size
    features_per_col = 2 if bits == 4 else 1
    block_k = _tpu_block_k(padded_in, num_groups, group_size, bits, block_sizes.block_k)
    block_w = block_k // features_per_col
    block_o = min(block_sizes.block_o, max(_TPU_MAX_TILE // block_w, _TPU_LANES))
    block_o = _tpu_block_o(num_out, block_o)
    block_r, padded_rows = _tpu_rows(num_rows, x_planes[0].dtype, block_sizes.block_r)
    if padded_rows != num_rows:
        pad = ((0, padded_rows - num_rows), (0, 0))
        x_planes = tuple(jnp.pad(p, pad) for p in x_planes)
        xsum = None if xsum is None else jnp.pad(xsum, pad)
    if bits == 4:
        data = lax.bitcast_convert_type(data, jnp.int8)  # a free view; Mosaic extends int8
    one_group, has_offset = num_groups == 1, offset is not None
    if one_group:  # scale and offset multiply the output block: [1, O] rows
        scale, offset = (None if a is None else a.reshape(1, num_out) for a in (scale, offset))
    operands = [*x_planes, data, scale] + ([offset, xsum] if has_offset else [])
    blocks = dict(block_r=block_r, block_o=block_o, block_w=block_w, block_g=block_k // group_size)
    in_specs = _tpu_in_specs(len(x_planes), one_group, has_offset, **blocks)
    out = pl.pallas_call(
        functools.partial(
            _qmatmul_kernel,
            bits=bits,
            group_width=group_size // features_per_col,
            one_group=one_group,
            has_offset=has_offset,
            precision=_precision(x_planes[0].dtype),
        ),
        out_shape=jax.ShapeDtypeStruct((padded_rows, num_out), jnp.float32),
        grid=(padded_rows // block_r, num_out // block_o, padded_in // block_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_r, block_o), lambda r, o, k: (r, o)),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=_cost(padded_rows, num_out, padded_in, operands),
        interpret=interpret,
        name="qmatmul",
    )(*operands)
    return out[:num_rows]


def _tpu_in_specs(num_planes, one_group, has_offset, *, block_r, block_o, block_w, block_g):
    """Blocks of the x planes, data, scale[, offset, xsum] for grid (row, output, K)."""
    specs = [pl.BlockSpec((block_r, block_w), lambda r, o, k: (r, k))] * num_planes
    specs.append(pl.BlockSpec((block_o, block_w), lambda r, o, k: (o, k)))
    if one_group:
        per_group = pl.BlockSpec((1, block_o), lambda r, o, k: (0, o))  # [1, O]
        xsum = pl.BlockSpec((block_r, 1), lambda r, o, k: (r, 0))  # [R, 1]
    else:
        per_group = pl.BlockSpec((block_o, block_g), lambda r, o, k: (o, k))  # [O, G]
        xsum = pl.BlockSpec((block_r, block_g), lambda r, o, k: (r, k))  # [R, G]
    return specs + ([per_group, per_group, xsum] if has_offset else [per_group])


def _tpu_rows(num_rows, dtype, block_r):
    """(rows per block, padded rows): whole sublane tiles, blocks of at most ``block_r``."""
    sublanes = 8 * (4 // jnp.dtype(dtype).itemsize)  # 8 rows of float32, 16 of bfloat16
    padded = pl.cdiv(num_rows, sublanes) * sublanes
    if padded <= block_r:
        return padded, padded
    if block_r % sublanes:
        raise ValueError(
            f"{block_r=} must be a multiple of {sublanes} on TPU for {dtype} when it does not"
            f" cover all {num_rows=}"
        )
    num_blocks = pl.cdiv(padded, block_r)  # balanced: 300 rows are 2 x 152, not 2 x 256
    block = pl.cdiv(pl.cdiv(num_rows, num_blocks), sublanes) * sublanes
    return block, num_blocks * block


def _cost(num_rows, num_out, padded_in, operands):
    bytes_accessed = sum(a.size * a.dtype.itemsize for a in operands) + num_rows * num_out * 4
    return pl.CostEstimate(
        flops=2 * num_rows * num_out * padded_in, transcendentals=0, bytes_accessed=bytes_accessed
    )


def _precision(dtype):
    # float32 activations: dot at full float32 precision, as the reference does. bfloat16:
    # the dequantized tile is rounded to bfloat16 for a single MXU pass.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ------------------------------------------------------------------------------ GPU
def _qmatmul_cuda(x_planes, data, scale, offset, bits, group_size, block_sizes, interpret):
    num_rows, num_out = x_planes[0].shape[0], data.shape[0]
    features_per_col = 2 if bits == 4 else 1
    block_k = block_sizes.block_k or BlockSizes.get_default("cuda").block_k
    block_w = block_k // features_per_col
    gpu.check_blocks(block_sizes.block_r, block_sizes.block_o, block_w)
    num_steps = pl.cdiv(data.shape[1], block_w)
    num_blocks = pl.cdiv(num_rows, block_sizes.block_r) * pl.cdiv(num_out, block_sizes.block_o)
    num_splits = block_sizes.num_splits or pl.cdiv(_TARGET_GPU_PROGRAMS, num_blocks)
    return gpu.qmatmul_gpu(
        x_planes,
        data,
        scale,
        offset,
        group_width=group_size // features_per_col,
        block_r=block_sizes.block_r,
        block_o=block_sizes.block_o,
        block_w=block_w,
        num_splits=min(num_splits, num_steps),
        precision=_precision(x_planes[0].dtype),
        interpret=interpret,
    )


# ------------------------------------------------------------------------ the wrapper
def _split_planes(x, bits, group_size):
    """int4: x [R, Ip] -> (first halves, second halves) of every group, each [R, Ip/2]."""
    if bits == 8:
        return (x,)
    num_rows, padded_in = x.shape
    halves = x.reshape(num_rows, padded_in // group_size, 2, group_size // 2)
    return tuple(halves[:, :, h].reshape(num_rows, padded_in // 2) for h in (0, 1))


def _check_inputs(x, data, scale, offset, bits, group_size):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{bits=} must be one of {SUPPORTED_BITS}")
    if group_size < 1 or (bits == 4 and group_size % 2):
        raise ValueError(f"{group_size=} must be positive (and even for int4)")
    if x.ndim != 2 or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x ({x.dtype}{x.shape}) must be [R, Ip] float32 or bfloat16")
    if scale.ndim != 2 or scale.dtype != jnp.float32:
        raise ValueError(f"scale ({scale.dtype}{scale.shape}) must be float32 [O, G]")
    num_out, num_groups = scale.shape
    padded_in = num_groups * group_size
    if x.shape[1] != padded_in:
        raise ValueError(
            f"x.shape={x.shape} must have {padded_in=} columns (G={num_groups} groups of"
            f" {group_size=}): pad x with zeros to whole groups"
        )
    want = (num_out, padded_in // (2 if bits == 4 else 1))
    want_dtype = jnp.dtype(jnp.uint8 if bits == 4 else jnp.int8)
    if data.shape != want or data.dtype != want_dtype:
        raise ValueError(
            f"data ({data.dtype}{data.shape}) must be {want_dtype}{want} for {bits=},"
            f" scale.shape={scale.shape}, {group_size=}"
        )
    if offset is not None and (offset.shape != scale.shape or offset.dtype != jnp.float32):
        raise ValueError(
            f"offset ({offset.dtype}{offset.shape}) must be float32 like scale.shape={scale.shape}"
        )


def qmatmul(
    x: jax.Array,
    data: jax.Array,
    scale: jax.Array,
    offset: jax.Array | None,
    *,
    bits: int,
    group_size: int,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """``x @ w.T`` with ``w`` kept quantized, same contract as ``qmatmul_reference``.

    Args:
      x: ``[R, Ip]`` float32 or bfloat16, zero-padded to whole groups.
      data: int8 ``[O, Ip]`` (bits=8) or uint8 ``[O, Ip // 2]`` (bits=4, group-halves
        nibbles), as in ``ir/qformat.QuantizedWeight`` (outliers are the caller's).
      scale: float32 ``[O, G]``.
      offset: float32 ``[O, G]`` or None.
      bits: 4 or 8.
      group_size: input features per group (``Ip`` for one scale per output feature).
      block_sizes: tiling, ``BlockSizes.get_default(platform, num_rows=R)`` if None.
      interpret: run the kernel in Pallas interpret mode (on CPU).
      platform: "tpu" (Mosaic TPU) or "cuda" (Triton); None picks the default
        backend's (on CPU with ``interpret``: the TPU kernel). Pass it explicitly when
        exporting for another platform.

    Returns:
      ``[R, O]`` float32, accumulated in float32. With bfloat16 ``x`` the dequantized
      weight tile is rounded to bfloat16 before its dot.
    """
    _check_inputs(x, data, scale, offset, bits, group_size)
    platform = resolve_platform(platform, interpret)
    num_rows = x.shape[0]
    num_out, num_groups = scale.shape
    block_sizes = block_sizes or BlockSizes.get_default(platform, num_rows=num_rows)
    if num_rows == 0 or num_out == 0 or num_groups == 0:
        return jnp.zeros((num_rows, num_out), jnp.float32)
    x_planes = _split_planes(x, bits, group_size)
    if platform == "cuda":
        return _qmatmul_cuda(
            x_planes, data, scale, offset, bits, group_size, block_sizes, interpret
        )
    xsum = None
    if offset is not None:
        x32 = x.astype(jnp.float32).reshape(num_rows, num_groups, group_size)
        xsum = jnp.sum(x32, axis=2)  # [R, G]
    return _qmatmul_tpu(
        x_planes,
        data,
        scale,
        offset,
        xsum,
        bits=bits,
        group_size=group_size,
        block_sizes=block_sizes,
        interpret=interpret,
    )
