"""KIVI decode attention as a Pallas kernel: Mosaic TPU (this file) and Triton GPU (``gpu.py``).

One query per sequence attends to one layer's KIVI cache (``ir/kvcache/kivi.py``)
without dequantizing it in HBM: each block of packed keys and values is unpacked
and dequantized in VMEM, attended with an online softmax in float32, and the
full-precision rows (the residual ring, and the ``first`` rows with
``full_first``) join at the last grid step.

TPU grid: (sequence, kv head, token block). ``lengths`` is scalar-prefetched: the
index maps clamp the block index into the blocks that hold attended quantized
positions (``[max(window start, full_first), num_quantized(L))``), so other steps
revisit the block already in VMEM (no DMA) and skip their compute. Lane-splitting
reshapes are avoided (Mosaic has none that is cheap): the strided bytes are spread
to the ``H`` channels by a matmul with a 0/1 matrix (exact: bytes are integers
below 256, exact in bfloat16) and shifted per channel, and per-group scales and
zero points are spread to tokens (keys) or channels (values) the same way
(bfloat16 exactly in one pass, float32 at HIGHEST precision).

TPU blocks: ``block_s`` tokens of the packed arrays, a multiple of 128 and of
``8 * G`` (float32 scales) or ``16 * G`` (bfloat16), so the key scales' block is
whole sublane tiles; or at least ``S`` (one block). The ring and ``first`` arrays
are single blocks, fetched once per (sequence, kv head).

Dtypes: ``q``, the ring and the scales float32 or bfloat16; other dtypes (float16)
fall back to the reference on both platforms. Dots run in ``q``'s dtype with
float32 accumulation (float32 at HIGHEST precision), like ``decode_attention``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallax.pallas_kernels.kivi_attention import gpu
from pallax.pallas_kernels.kivi_attention.bounds import (
    FIRST_PARTS,
    PARTS,
    block_range,
    bounds,
    first_attended,
    ring_attended,
    ring_positions,
)
from pallax.pallas_kernels.kivi_attention.checks import check_inputs, check_tpu_block
from pallax.pallas_kernels.kivi_attention.reference import kivi_decode_attention_reference
from pallax.pallas_kernels.platforms import resolve_platform

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_TPU_LANES = 128
_TARGET_GPU_PROGRAMS = 132  # one wave on an H100 SXM
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # [M, H] x [N, H] -> [M, N]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Token tiling of the packed arrays.

    block_s: tokens per block. TPU: a multiple of 128 and of ``8 * G`` (float32
      scales) or ``16 * G`` (bfloat16), or at least ``S``. GPU: a power of two, at
      least 16 (Triton dot tiles); the ring is walked in blocks of the same size.
    num_splits: GPU only, token-axis splits run by separate programs (FlashDecoding);
      None picks enough to fill the GPU for small ``B * K``.
    """

    block_s: int
    num_splits: int | None = None

    def __post_init__(self):
        if self.block_s < 1:
            raise ValueError(f"{self.block_s=} must be positive")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"{self.num_splits=} must be positive")

    @classmethod
    def get_default(
        cls, platform: str = "tpu", *, group_size: int = 32, head_dim: int = 128
    ) -> BlockSizes:
        if platform == "tpu":
            return cls(block_s=max(512, math.lcm(_TPU_LANES, 16 * group_size)))
        # GPU: the dequantized [block_s, H] key and value tiles live in registers.
        return cls(block_s=64 if head_dim <= 128 else 32)


# ------------------------------------------------------------------------------ TPU
def _kivi_kernel(
    lengths_ref,  # [B] int32, scalar-prefetched into SMEM
    q_ref,  # [Gq, H]
    kd_ref,  # [block_s, H*b/8] int8 (the packed bytes)
    ks_ref,  # [block_s/G, H] key scales of the block's groups
    kz_ref,  # [block_s/G, H] key zero points
    kr_ref,  # [C, H] key ring
    vd_ref,  # [block_s, H*b/8] int8
    vs_ref,  # [block_s, H/G] value scales
    vz_ref,  # [block_s, H/G] value zero points
    vr_ref,  # [C, H] value ring
    *rest,  # ([F, H] k.first, v.first with full_first), o_ref [Gq, H], then 3 scratch refs
    bits: int,
    group_size: int,
    residual: int,
    full_first: int,
    seq_len: int,
    block_s: int,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
):
    firsts, (o_ref, max_ref, denom_ref, acc_ref) = rest[:-4], rest[-4:]
    # max_ref, denom_ref [Gq, 1] and acc_ref [Gq, H]: float32 online-softmax state.
    b, i = pl.program_id(0), pl.program_id(2)
    length = lengths_ref[b]
    lo, nq, packed_lo, packed_hi = bounds(
        length, group_size=group_size, residual=residual, sliding_window=sliding_window,
        full_first=full_first, seq_len=seq_len,
    )  # fmt: skip
    first, stop = block_range(packed_lo, packed_hi, block_s)
    attend = functools.partial(
        _attend, q_ref[...], max_ref, denom_ref, acc_ref, scale=scale, softcap=softcap
    )

    @pl.when(i == 0)
    def _init():
        max_ref[...] = jnp.full_like(max_ref, -jnp.inf)
        denom_ref[...] = jnp.zeros_like(denom_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((i >= first) & (i < stop))
    def _packed_block():
        def attended(row):
            pos = i * block_s + row
            return (pos >= packed_lo) & (pos < packed_hi)

        # A key group's scale reaches every token through the spreading matmul: zero
        # those of groups with no attended token, which may hold anything (NaN too).
        k_scale, k_zero = ks_ref[...], kz_ref[...]
        start = i * block_s + lax.broadcasted_iota(jnp.int32, k_scale.shape, 0) * group_size
        used = (start + group_size > packed_lo) & (start < packed_hi)
        k_scale = jnp.where(used, k_scale, jnp.zeros_like(k_scale))
        k_zero = jnp.where(used, k_zero, jnp.zeros_like(k_zero))
        keys = _dequantize_keys(kd_ref[...], k_scale, k_zero, bits, group_size)
        values = _dequantize_values(vd_ref[...], vs_ref[...], vz_ref[...], bits, group_size)
        attend(keys, values, attended)

    @pl.when(i == pl.num_programs(2) - 1)
    def _full_precision_rows_and_finalize():
        ring = kr_ref.shape[0]
        attend(
            kr_ref[...],
            vr_ref[...],
            lambda slot: ring_attended(ring_positions(slot, length, ring), lo, nq),
        )
        if firsts:
            kf_ref, vf_ref = firsts
            attend(kf_ref[...], vf_ref[...], lambda j: first_attended(j, lo, nq, full_first))
        denom = denom_ref[...]
        out = acc_ref[...] / jnp.where(denom > 0, denom, 1.0)
        o_ref[...] = out.astype(o_ref.dtype)


def _attend(q, max_ref, denom_ref, acc_ref, keys, values, attended, *, scale, softcap):
    """One online-softmax step: ``q`` [Gq, H] over ``keys``, ``values`` [n, H], where
    ``attended(row index array)`` tells which of the n rows take part."""
    dtype = q.dtype
    precision = _precision(dtype)
    logits = lax.dot_general(
        q, keys.astype(dtype), _CONTRACT_LAST, precision=precision,
        preferred_element_type=jnp.float32,
    ) * scale  # fmt: skip  # [Gq, n]
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(attended(lax.broadcasted_iota(jnp.int32, logits.shape, 1)), logits, -jnp.inf)
    prev_max = max_ref[...]  # [Gq, 1]
    new_max = jnp.maximum(prev_max, jnp.max(logits, axis=1, keepdims=True))
    # Nothing attended yet: a zero reference keeps exp(-inf - m) at 0 instead of NaN.
    safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
    alpha = jnp.exp(prev_max - safe_max)  # [Gq, 1]
    probs = jnp.exp(logits - safe_max)  # [Gq, n]
    denom_ref[...] = alpha * denom_ref[...] + jnp.sum(probs, axis=1, keepdims=True)
    max_ref[...] = new_max
    # Rows that do not take part may hold anything (NaN too), and 0 * NaN poisons p @ v.
    values = values.astype(dtype)
    row = lax.broadcasted_iota(jnp.int32, values.shape, 0)
    values = jnp.where(attended(row), values, jnp.zeros_like(values))
    update = jnp.dot(
        probs.astype(dtype), values, precision=precision, preferred_element_type=jnp.float32
    )  # [Gq, H]
    acc_ref[...] = alpha * acc_ref[...] + update


def _unpack(data, bits: int, head_dim: int):
    """Packed bytes [n, H*b/8] int8 -> the b-bit values [n, H] int32 (strided layout:
    channel ``m * H/per + j`` is bits ``[m*b, (m+1)*b)`` of byte ``j``)."""
    d = data.astype(jnp.int32)  # sign-extended; the mask below keeps the low bits
    mask = (1 << bits) - 1
    per = 8 // bits
    if per == 1:
        return d & mask
    width = head_dim // per
    # Spread byte j to columns j + m * width: a 0/1 matmul, exact (|byte| < 256 in bfloat16).
    row = lax.broadcasted_iota(jnp.int32, (width, head_dim), 0)
    col = lax.broadcasted_iota(jnp.int32, (width, head_dim), 1)
    pick = functools.reduce(jnp.logical_or, [col == row + m * width for m in range(per)])
    spread = jnp.dot(
        d.astype(jnp.float32).astype(jnp.bfloat16),
        jnp.where(pick, 1.0, 0.0).astype(jnp.bfloat16),
        preferred_element_type=jnp.float32,
    )  # [n, H]
    col = lax.broadcasted_iota(jnp.int32, spread.shape, 1)
    shift = sum(jnp.where(col >= m * width, bits, 0) for m in range(1, per))  # [n, H]
    return lax.shift_right_arithmetic(spread.astype(jnp.int32), shift) & mask


def _spread(x, width: int, size: int, axis: int):
    """Repeat every row (axis 0) or column (axis 1) of ``x`` ``width`` times, cut to
    ``size``: a matmul with a 0/1 matrix, exact (one nonzero term per output)."""
    shape = (size, x.shape[0]) if axis == 0 else (x.shape[1], size)
    index = lax.broadcasted_iota(jnp.int32, shape, axis)
    start = lax.broadcasted_iota(jnp.int32, shape, 1 - axis) * width
    onehot = jnp.where((index >= start) & (index < start + width), 1.0, 0.0).astype(x.dtype)
    operands = (onehot, x) if axis == 0 else (x, onehot)
    return jnp.dot(*operands, precision=_precision(x.dtype), preferred_element_type=jnp.float32)


def _dequantize_keys(data, scale, zero, bits: int, group_size: int):
    """[n, H*b/8], per-channel scale and zero [n/G, H] -> float32 [n, H]."""
    n, head_dim = data.shape[0], scale.shape[1]
    values = _unpack(data, bits, head_dim).astype(jnp.float32)
    return values * _spread(scale, group_size, n, 0) + _spread(zero, group_size, n, 0)


def _dequantize_values(data, scale, zero, bits: int, group_size: int):
    """[n, H*b/8], per-token scale and zero [n, H/G] -> float32 [n, H]."""
    head_dim = scale.shape[1] * group_size
    values = _unpack(data, bits, head_dim).astype(jnp.float32)
    return values * _spread(scale, group_size, head_dim, 1) + _spread(zero, group_size, head_dim, 1)


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _kivi_tpu(
    q, state, lengths, *, bits, group_size, residual, full_first, sliding_window, block_s,
    interpret, **static,
):  # fmt: skip
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, seq_len, width = state["k.data"].shape
    group = num_heads // num_kv_heads
    block_s = min(block_s, seq_len)
    block_g = state["k.scale"].shape[2] if block_s == seq_len else block_s // group_size
    q = q.reshape(batch, num_kv_heads, group, head_dim)  # [B, K, Gq, H]
    geometry = dict(
        group_size=group_size, residual=residual, full_first=full_first,
        sliding_window=sliding_window, seq_len=seq_len,
    )  # fmt: skip

    def packed_index(b, h, i, lengths_ref):
        _, _, lo, hi = bounds(lengths_ref[b], **geometry)
        first, stop = block_range(lo, hi, block_s)
        return b, h, jnp.clip(i, first, jnp.maximum(stop - 1, first)), 0

    def whole_index(b, h, i, lengths_ref):
        return b, h, 0, 0

    def spec(rows, cols, index):
        return pl.BlockSpec((None, None, rows, cols), index)

    qo_spec = spec(group, head_dim, whole_index)
    data_spec = spec(block_s, width, packed_index)
    kscale_spec = spec(block_g, head_dim, packed_index)
    vscale_spec = spec(block_s, state["v.scale"].shape[3], packed_index)
    ring_spec = spec(state["k.res"].shape[2], head_dim, whole_index)
    in_specs = [qo_spec, data_spec, kscale_spec, kscale_spec, ring_spec]
    in_specs += [data_spec, vscale_spec, vscale_spec, ring_spec]
    operands = [q] + [state[p] for p in PARTS]
    if full_first:
        in_specs += [spec(full_first, head_dim, whole_index)] * 2
        operands += [state[p] for p in FIRST_PARTS]
    # Mosaic extends int8, not uint8: a same-width bitcast is a free view.
    operands[1] = lax.bitcast_convert_type(operands[1], jnp.int8)
    operands[5] = lax.bitcast_convert_type(operands[5], jnp.int8)
    out = pl.pallas_call(
        functools.partial(_kivi_kernel, bits=bits, block_s=block_s, **geometry, **static),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, num_kv_heads, pl.cdiv(seq_len, block_s)),
            in_specs=in_specs,
            out_specs=qo_spec,
            scratch_shapes=[
                pltpu.VMEM((group, 1), jnp.float32),
                pltpu.VMEM((group, 1), jnp.float32),
                pltpu.VMEM((group, head_dim), jnp.float32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="kivi_decode_attention",
    )(lengths, *operands)
    return out.reshape(batch, num_heads, head_dim)


# ------------------------------------------------------------------------ the wrapper
def kernel_supports(platform: str, q_dtype, state: dict, bits: int) -> bool:
    """Whether ``platform``'s kernel covers this case (else the wrapper uses the reference).

    Both: ``q``, the full-precision rows and the scales float32 or bfloat16. GPU also
    needs a power-of-two ``H`` with ``H * bits / 8 >= 16`` (Triton tiles).
    """
    dtypes = {jnp.dtype(q_dtype), state["k.res"].dtype, state["k.scale"].dtype}
    if not dtypes <= set(SUPPORTED_DTYPES):
        return False
    if platform == "cuda":
        head_dim = state["k.res"].shape[-1]
        return head_dim & (head_dim - 1) == 0 and head_dim * bits // 8 >= gpu.MIN_TILE
    return True


def kivi_decode_attention(
    q: jax.Array,
    state: dict[str, jax.Array],
    lengths: jax.Array,
    *,
    bits: int,
    group_size: int,
    residual: int,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    full_first: int = 0,
    pending: int = 0,
    platform: str | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Single-query grouped-query attention over a KIVI cache (one decode step).

    Same contract as ``kivi_decode_attention_reference``: ``q`` [B, N, H], ``state``
    one layer's cache (``PARTS``, plus ``FIRST_PARTS`` with ``full_first``),
    ``lengths`` [B] int32 tokens written (the query is position ``lengths - 1``).
    Rows that are not attended (unwritten, stale ring slots, before the window)
    never reach the output, even when they hold NaN.

    Cases a kernel does not cover fall back to the reference (XLA) on that platform:
    float16 ``q``, ring or scales (both platforms), and on GPU a head dim that is not
    a power of two or has ``H * bits / 8 < 16`` (``kernel_supports``).

    Args:
      bits, group_size, residual, full_first: the cache's KIVI format.
      pending: the newest ``pending`` tokens are in the ring but their groups not yet
        quantized (the attention op writes the query's token to the ring, attends, then
        quantizes a full group): positions below ``num_quantized(lengths - pending)``
        are read from the packed arrays. As ``num_quantized(L - p; R) =
        num_quantized(L; R + p)``, it is a larger residual for the bounds.
      scale: multiplies the logits.
      sliding_window: attend only to positions ``> lengths - 1 - sliding_window``.
      softcap: if set, ``logits = softcap * tanh(logits / softcap)`` before masking.
      platform: "tpu" (Mosaic TPU) or "cuda" (Triton); None picks the default
        backend's (on CPU with ``interpret``: the TPU kernel). Pass it explicitly when
        exporting for another platform.
      interpret: run the kernel in Pallas interpret mode (on CPU).
      block_sizes: token tiling, ``BlockSizes.get_default(platform, ...)`` if None.

    Returns:
      ``[B, N, H]`` in ``q.dtype``.
    """
    check_inputs(q, state, lengths, bits, group_size, residual, full_first, sliding_window, softcap)
    platform = resolve_platform(platform, interpret)
    static = dict(
        scale=float(scale),
        sliding_window=None if sliding_window is None else int(sliding_window),
        softcap=None if softcap is None else float(softcap),
    )
    geometry = dict(
        bits=bits, group_size=group_size, residual=residual + pending, full_first=full_first
    )
    if not kernel_supports(platform, q.dtype, state, bits):
        return kivi_decode_attention_reference(q, state, lengths, **geometry, **static)
    head_dim = q.shape[-1]
    block_sizes = block_sizes or BlockSizes.get_default(
        platform, group_size=group_size, head_dim=head_dim
    )
    lengths = jnp.maximum(lengths, 0)
    seq_len = state["k.data"].shape[2]
    if platform == "cuda":
        gpu.check_block(block_sizes.block_s)
        batch, num_kv_heads = state["k.data"].shape[:2]
        num_blocks = pl.cdiv(seq_len, block_sizes.block_s)
        num_splits = block_sizes.num_splits or pl.cdiv(_TARGET_GPU_PROGRAMS, batch * num_kv_heads)
        return gpu.kivi_decode_attention_gpu(
            q, state, lengths, block_s=block_sizes.block_s,
            num_splits=min(num_splits, num_blocks), interpret=interpret, **geometry, **static,
        )  # fmt: skip
    check_tpu_block(block_sizes.block_s, seq_len, group_size, state["k.scale"].dtype)
    return _kivi_tpu(
        q, state, lengths, block_s=block_sizes.block_s, interpret=interpret, **geometry, **static
    )
