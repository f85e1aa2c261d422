"""Prefill attention as a Pallas kernel: Mosaic TPU (this file) and Triton GPU (``gpu.py``).

A chunk of ``T`` queries per sequence, at positions ``pos[b] + t``, attends causally to
a dense KV cache ``[B, K, S, H]`` that already holds the chunk's keys (FlashAttention-2:
queries tiled, keys visited in blocks with an online softmax, nothing of size ``T x S``
materialised). The ``G = N / K`` query heads of a kv head are rows of one tile, so the
keys are read once per kv head, never repeated per query head (GQA). The query offset
makes a later chunk of a chunked prefill attend everything before it.

TPU grid: (sequence, kv head, query block, key block). ``pos`` is scalar-prefetched:
the K/V index maps clamp the key-block index into the blocks that a query block sees
(causal, and after a window's start), so other steps revisit the block already in VMEM
(no DMA) and skip their compute with ``pl.when``. The queries are laid out
``[B, K, T * G, H]`` (rows ordered query-major), padded to whole query blocks; a row's
query index comes from a small int32 column (``row // G``), as Mosaic has no cheap
vector division.

TPU blocks: ``block_q * G`` rows (``block_q`` a multiple of 16) and ``block_k`` keys, a
multiple of 128 or the whole cache. The partial last key block's rows past ``S`` are
masked like any unseen slot.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallax.pallas_kernels.flash_attention import gpu
from pallax.pallas_kernels.flash_attention.reference import visible
from pallax.pallas_kernels.platforms import resolve_platform

_TPU_LANES = 128
_TPU_ROWS = 16  # query blocks in whole sublane tiles for 32- and 16-bit dtypes
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # [R, H] x [block_k, H] -> [R, block_k]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query and key tiling.

    block_q: queries per block (each brings its ``G`` query heads as rows). TPU: a
      multiple of 16 (a shorter chunk takes one block of its length rounded up to 16).
      GPU: a power of two with ``block_q * next_pow2(G) >= 16``.
    block_k: keys per block. TPU: a multiple of 128, or at least ``S``. GPU: a power
      of two of at least 16.
    """

    block_q: int
    block_k: int

    def __post_init__(self):
        if self.block_q < 1 or self.block_k < 1:
            raise ValueError(f"{self.block_q=} and {self.block_k=} must be positive")

    @classmethod
    def get_default(cls, platform: str = "tpu", *, head_dim: int = 128, group: int = 1
                    ) -> BlockSizes:  # fmt: skip
        if platform == "tpu":
            return cls(block_q=128, block_k=512)
        # GPU: the [R, H] query and output tiles and the [block_k, H] key and value tiles
        # live in registers: R = block_q * Gp rows, 128 (64 for H > 128).
        rows = 128 if head_dim <= 128 else 64
        return cls(block_q=max(1, rows // gpu.padded_group(group)),
                   block_k=64 if head_dim <= 128 else 32)  # fmt: skip


def supports(q_shape, k_shape, dtype, platform: str) -> bool:
    """Whether a kernel covers these shapes on ``platform`` (the lowering falls back to the
    reference otherwise): TPU any; GPU float32/bfloat16/float16 and a head dim that is a
    power of two from 16 to 256 (Triton tiles)."""
    if platform == "tpu":
        return True
    return gpu.supports(q_shape[-1], dtype)


def _block_bounds(p, j, *, block_q, block_k, t_len, seq_len, sliding_window):
    """Keys ``[lo, hi)`` and key blocks ``[first, stop)`` that the real queries of query
    block ``j`` of a sequence at ``p`` see (padding queries past ``t_len`` see nothing
    more: the slots after the chunk may hold anything)."""
    q_lo = p + j * block_q  # the block's first and last real query positions
    q_hi = p + jnp.minimum((j + 1) * block_q, t_len) - 1
    lo = jnp.int32(0) if sliding_window is None else jnp.maximum(q_lo - sliding_window + 1, 0)
    hi = q_hi + 1 if seq_len is None else jnp.minimum(q_hi + 1, seq_len)  # None: candidates
    first = lax.div(lo, block_k)  # non-negative: truncation is floor
    stop = jnp.maximum(lax.div(hi + block_k - 1, block_k), first)
    return lo, hi, first, stop


def _flash_attention_kernel(
    pos_ref,  # [B] int32, scalar-prefetched into SMEM
    row_ref,  # [R, 1] int32: each row's query index within the block (row // G)
    q_ref,  # [R, H]
    k_ref,  # [block_k, H]
    v_ref,  # [block_k, H]
    *refs,  # candidates: kpos as a row [1, block_k] and a column [block_k, 1]; then
    # o_ref [R, H]; scratch: running max [R, 1], denominator [R, 1], output [R, H] (f32)
    scale: float,
    block_q: int,
    block_k: int,
    t_len: int,
    seq_len: int,
    sliding_window: int | None,
    softcap: float | None,
    candidates: bool,
):
    if candidates:
        kpos_row_ref, kpos_col_ref, o_ref, max_ref, denom_ref, acc_ref = refs
    else:
        o_ref, max_ref, denom_ref, acc_ref = refs
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    p = pos_ref[b]
    lo, hi, first, stop = _block_bounds(p, j, block_q=block_q, block_k=block_k, t_len=t_len,
                                        seq_len=None if candidates else seq_len,
                                        sliding_window=sliding_window)  # fmt: skip
    if candidates:  # unordered keys: every block, each key's position read
        first, stop = 0, pl.num_programs(3)

    @pl.when(i == 0)
    def _init():
        max_ref[...] = jnp.full_like(max_ref, -jnp.inf)
        denom_ref[...] = jnp.zeros_like(denom_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((i >= first) & (i < stop))
    def _attend_block():
        q = q_ref[...]
        k = k_ref[...]
        logits = lax.dot_general(q, k, _CONTRACT_LAST, preferred_element_type=jnp.float32)
        logits = logits * scale  # [R, block_k]
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        q_pos = p + j * block_q + row_ref[...]  # [R, 1]
        if candidates:
            k_pos, v_pos = kpos_row_ref[...], kpos_col_ref[...]  # [1, block_k], [block_k, 1]
            ok = visible(q_pos, k_pos, None, sliding_window)
            v_seen = (v_pos >= lo) & (v_pos < hi)  # [block_k, 1]
        else:
            k_pos = i * block_k + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
            ok = visible(q_pos, k_pos, seq_len, sliding_window)
            v_pos = i * block_k + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
            v_seen = (v_pos >= lo) & (v_pos < hi)
        logits = jnp.where(ok, logits, -jnp.inf)
        prev_max = max_ref[...]
        new_max = jnp.maximum(prev_max, jnp.max(logits, axis=1, keepdims=True))
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)  # a row that saw nothing yet
        alpha = jnp.exp(prev_max - safe_max)
        probs = jnp.exp(logits - safe_max)
        denom_ref[...] = alpha * denom_ref[...] + jnp.sum(probs, axis=1, keepdims=True)
        max_ref[...] = new_max
        # Keys no row of the block sees may hold NaN, and 0 * NaN would poison probs @ v.
        v = v_ref[...]
        v = jnp.where(v_seen, v, jnp.zeros_like(v))
        update = jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_ref[...] = alpha * acc_ref[...] + update

    @pl.when(i == pl.num_programs(3) - 1)
    def _finalize():
        denom = denom_ref[...]
        o_ref[...] = (acc_ref[...] / jnp.where(denom > 0, denom, 1.0)).astype(o_ref.dtype)


def _flash_attention_tpu(q, k_cache, v_cache, pos, kpos, *, block_q, block_k, interpret,
                         **static):  # fmt: skip
    batch, t, num_heads, head_dim = q.shape
    _, num_kv_heads, seq_len, _ = k_cache.shape
    group = num_heads // num_kv_heads
    block_q = min(block_q, pl.cdiv(t, _TPU_ROWS) * _TPU_ROWS)
    block_k = min(block_k, seq_len)
    t_pad = pl.cdiv(t, block_q) * block_q
    rows = block_q * group
    q = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    q = q.reshape(batch, t_pad, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q = q.reshape(batch, num_kv_heads, t_pad * group, head_dim)  # rows (query, group)
    row_index = (jnp.arange(rows, dtype=jnp.int32) // group)[:, None]
    bounds = functools.partial(_block_bounds, block_q=block_q, block_k=block_k, t_len=t,
                               seq_len=seq_len,
                               sliding_window=static["sliding_window"])  # fmt: skip
    candidates = kpos is not None
    extra_specs, extra = [], []
    if candidates:  # whole blocks of keys: the padding is no key (-1)
        s_pad = pl.cdiv(seq_len, block_k) * block_k
        pad = ((0, 0), (0, 0), (0, s_pad - seq_len))
        k_cache, v_cache = (jnp.pad(c, (*pad, (0, 0))) for c in (k_cache, v_cache))
        kpos = jnp.pad(kpos, pad, constant_values=-1)
        heads = kpos.shape[1]  # K, or 1 when every kv head's keys sit at the same positions
        kh = (lambda h: h) if heads > 1 else (lambda h: 0)
        extra = [kpos[:, :, None, :], kpos[:, :, :, None]]
        extra_specs = [
            pl.BlockSpec((None, None, 1, block_k), lambda b, h, j, i, _: (b, kh(h), 0, i)),
            pl.BlockSpec((None, None, block_k, 1), lambda b, h, j, i, _: (b, kh(h), i, 0)),
        ]
        seq_len = s_pad

    def kv_index(b, h, j, i, pos_ref):
        if candidates:
            return b, h, i, 0
        _, _, first, stop = bounds(pos_ref[b], j)
        return b, h, jnp.clip(i, first, jnp.maximum(stop - 1, first)), 0

    qo_spec = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, j, i, _: (b, h, j, 0))
    kv_spec = pl.BlockSpec((None, None, block_k, head_dim), kv_index)
    row_spec = pl.BlockSpec((rows, 1), lambda b, h, j, i, _: (0, 0))
    out = pl.pallas_call(
        functools.partial(
            _flash_attention_kernel,
            block_q=block_q,
            block_k=block_k,
            t_len=t,
            seq_len=seq_len,
            candidates=candidates,
            **static,
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, num_kv_heads, t_pad // block_q, pl.cdiv(seq_len, block_k)),
            in_specs=[row_spec, qo_spec, kv_spec, kv_spec, *extra_specs],
            out_specs=qo_spec,
            scratch_shapes=[
                pltpu.VMEM((rows, 1), jnp.float32),
                pltpu.VMEM((rows, 1), jnp.float32),
                pltpu.VMEM((rows, head_dim), jnp.float32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="flash_attention",
    )(pos, row_index, q, k_cache, v_cache, *extra)
    out = out.reshape(batch, num_kv_heads, t_pad, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, t_pad, num_heads, head_dim)[:, :t]


def _check_inputs(q, k_cache, v_cache, pos, kpos, sliding_window, softcap):
    if q.ndim != 4 or k_cache.ndim != 4:
        raise ValueError(
            f"q.shape={q.shape} must be [B, T, N, H], k_cache.shape={k_cache.shape} [B, K, S, H]"
        )
    batch, _, num_heads, head_dim = q.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache.shape={v_cache.shape} must equal k_cache.shape={k_cache.shape}")
    k_batch, num_kv_heads, _, k_head_dim = k_cache.shape
    if (k_batch, k_head_dim) != (batch, head_dim):
        raise ValueError(f"k_cache.shape={k_cache.shape} does not match q.shape={q.shape} on B, H")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} must be divisible by {num_kv_heads=}")
    if pos.shape != (batch,) or pos.dtype != jnp.int32:
        raise ValueError(f"pos ({pos.shape}, {pos.dtype}) must be int32 [{batch}]")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"dtypes differ: {q.dtype=} {k_cache.dtype=} {v_cache.dtype=}")
    if kpos is not None:
        shapes = [(batch, k, k_cache.shape[2]) for k in {1, num_kv_heads}]
        if kpos.shape not in shapes or kpos.dtype != jnp.int32:
            raise ValueError(f"kpos ({kpos.shape}, {kpos.dtype}) must be int32 of {shapes}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{sliding_window=} must be positive or None")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"{softcap=} must be positive or None")


def flash_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    pos: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    kpos: jax.Array | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """Causal grouped-query attention of ``T`` queries per sequence over a dense cache.

    Same contract as ``flash_attention_reference``: ``q`` [B, T, N, H] at positions
    ``pos[b] + t``, caches [B, K, S, H] holding the chunk's keys, ``pos`` [B] int32;
    slots a query does not see never reach the output, even when they hold NaN. With
    ``kpos`` [B, K or 1, S] the keys are candidates at those positions (-1: none), in any
    order: every key block is visited, no block is skipped by position.

    Args:
      block_sizes: tiling, ``BlockSizes.get_default(platform, head_dim=H)`` if None.
      interpret: run the kernel in Pallas interpret mode (on CPU).
      platform: "tpu" (Mosaic TPU) or "cuda" (Triton); None picks the default
        backend's (on CPU with ``interpret``: the TPU kernel). Pass it explicitly when
        exporting for another platform.

    Returns:
      ``[B, T, N, H]`` in ``q.dtype``.
    """
    _check_inputs(q, k_cache, v_cache, pos, kpos, sliding_window, softcap)
    platform = resolve_platform(platform, interpret)
    group = q.shape[2] // k_cache.shape[1]
    block_sizes = block_sizes or BlockSizes.get_default(platform, head_dim=q.shape[-1],
                                                        group=group)  # fmt: skip
    static = dict(
        scale=float(scale),
        sliding_window=None if sliding_window is None else int(sliding_window),
        softcap=None if softcap is None else float(softcap),
    )
    if platform == "cuda":
        gpu.check(q.shape, k_cache.shape, q.dtype, block_sizes.block_q, block_sizes.block_k)
        return gpu.flash_attention_gpu(q, k_cache, v_cache, pos, kpos, block_q=block_sizes.block_q,
                                       block_k=block_sizes.block_k, interpret=interpret,
                                       **static)  # fmt: skip
    if block_sizes.block_q % _TPU_ROWS:
        raise ValueError(f"{block_sizes.block_q=} must be a multiple of {_TPU_ROWS} on TPU")
    seq_len = k_cache.shape[2]
    if block_sizes.block_k < seq_len and block_sizes.block_k % _TPU_LANES:
        raise ValueError(
            f"{block_sizes.block_k=} must be a multiple of {_TPU_LANES} on TPU when it is below"
            f" {seq_len=}"
        )
    return _flash_attention_tpu(q, k_cache, v_cache, pos, kpos, block_q=block_sizes.block_q,
                                block_k=block_sizes.block_k, interpret=interpret,
                                **static)  # fmt: skip
