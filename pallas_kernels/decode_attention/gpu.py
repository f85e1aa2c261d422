"""Decode attention on Mosaic GPU (Hopper wgmma), FlashDecoding style.

One CTA (one warpgroup) per (sequence, kv head, split). The ``G`` query heads
that share a kv head are zero-padded to the 64-row wgmma tile, so both matmuls
run on the tensor cores; decode is bound by reading the cache, not by these
FLOPs. Each split walks its share of the valid key blocks with an online
softmax, double-buffering K/V blocks through TMA, and writes a normalised
partial output and its log-sum-exp; ``combine_splits`` merges the splits.

Constraints: float16/bfloat16 (Mosaic GPU's tf32 wgmma does not take the
transposed K operand), ``H`` a multiple of 64 up to 256 and ``block_k`` a
multiple of 64 up to 256 (TMA boxes, wgmma tiles, 128-byte swizzled rows),
``G <= 64``, and the tiles must fit in shared memory (``smem_bytes``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallax.pallas_kernels.decode_attention.key_range import block_range, key_range

Q_ROWS = 64  # wgmma M
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MAX_TILE = 256  # largest TMA box side
_SWIZZLE_BYTES = 128
SMEM_BUDGET = 224 * 1024  # H100 opt-in shared memory per CTA, less Mosaic's own scratch


def smem_bytes(head_dim: int, block_k: int, dtype) -> int:
    """Shared memory for the q tile, two K and two V blocks, and the probabilities tile."""
    tiles = Q_ROWS * head_dim + 4 * block_k * head_dim + Q_ROWS * block_k
    return tiles * jnp.dtype(dtype).itemsize + 4 * Q_ROWS


def _decode_attention_gpu_kernel(
    lengths_gmem,  # [B] int32
    q_gmem,  # [B, K, 64, H]
    k_gmem,  # [B, K, S, H]; [B, K, H, S] in interpret mode
    v_gmem,  # [B, K, S, H]
    o_gmem,  # [B, K, P, 64, H] float32, each split normalised by its own sum
    lse_gmem,  # [B, K, P, 64] float32, log-sum-exp of each split's logits
    q_smem,  # [64, H]
    k_smem,  # [2, block_k, H]; [2, H, block_k] in interpret mode
    v_smem,  # [2, block_k, H]
    p_smem,  # [64, block_k]
    lse_smem,  # [64]
    q_barrier,
    k_barriers,  # [2]
    v_barriers,  # [2]
    *,
    scale: float,
    block_k: int,
    num_splits: int,
    sliding_window: int | None,
    softcap: float | None,
    interpret: bool,
):
    b = lax.axis_index("batch")
    h = lax.axis_index("kv_heads")
    split = lax.axis_index("splits")
    head_dim = q_smem.shape[-1]
    lo, hi = key_range(lengths_gmem[b], sliding_window)
    first, stop = block_range(lo, hi, block_k)
    per_split = lax.div(stop - first + num_splits - 1, num_splits)
    start = first + split * per_split
    stop = jnp.minimum(start + per_split, stop)

    def fetch(j, slot):
        keys = pl.ds(j * block_k, block_k)
        k_src = k_gmem.at[b, h, :, keys] if interpret else k_gmem.at[b, h, keys]
        plgpu.copy_gmem_to_smem(k_src, k_smem.at[slot], k_barriers.at[slot])
        plgpu.copy_gmem_to_smem(v_gmem.at[b, h, keys], v_smem.at[slot], v_barriers.at[slot])

    plgpu.copy_gmem_to_smem(q_gmem.at[b, h], q_smem, q_barrier)

    @pl.when(start < stop)
    def _prefetch_first():
        fetch(start, 0)

    plgpu.barrier_wait(q_barrier)

    def attend_block(j, carry):
        acc, row_max, denom = carry  # [64, H], [64], [64]
        slot = lax.rem(j - start, 2)
        plgpu.commit_smem()  # every thread is done with the other slot: refill it

        @pl.when(j + 1 < stop)
        def _prefetch_next():
            fetch(j + 1, 1 - slot)

        plgpu.barrier_wait(k_barriers.at[slot])

        def qk(acc_ref):
            k_tile = k_smem.at[slot]
            plgpu.wgmma(
                acc_ref, q_smem, k_tile if interpret else plgpu.transpose_ref(k_tile, (1, 0))
            )
            return acc_ref[...]

        logits = pl.run_scoped(qk, plgpu.ACC((Q_ROWS, block_k), jnp.float32)) * scale
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        pos = j * block_k + _wgmma_iota((Q_ROWS, block_k), 1, interpret)  # [64, block_k]
        logits = jnp.where((pos >= lo) & (pos < hi), logits, -jnp.inf)
        # Every block in [start, stop) holds a valid key, so new_max is finite.
        new_max = jnp.maximum(row_max, logits.max(axis=1))  # [64]
        alpha = jnp.exp(row_max - new_max)  # [64]
        probs = jnp.exp(logits - lax.broadcast_in_dim(new_max, logits.shape, [0]))
        denom = denom * alpha + probs.sum(axis=1)
        p_smem[...] = probs.astype(p_smem.dtype)

        plgpu.barrier_wait(v_barriers.at[slot])
        v_tile = v_smem.at[slot]

        @pl.when((j * block_k < lo) | ((j + 1) * block_k > hi))
        def _zero_outside():  # slots outside [lo, hi) may hold NaN, and 0 * NaN poisons p @ v
            v_pos = j * block_k + _wgmma_iota((block_k, head_dim), 0, interpret)  # [block_k, H]
            v = v_tile[...]
            v_tile[...] = jnp.where((v_pos >= lo) & (v_pos < hi), v, jnp.zeros_like(v))

        plgpu.commit_smem()

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p_smem, v_tile)
            return acc_ref[...]

        update = pl.run_scoped(pv, plgpu.ACC((Q_ROWS, head_dim), jnp.float32))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + update
        return acc, new_max, denom

    rows = plgpu.Layout.WGMMA.reduce(1)
    init = (
        _layout_cast(jnp.zeros((Q_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA, interpret),
        _layout_cast(jnp.full((Q_ROWS,), -jnp.inf, jnp.float32), rows, interpret),
        _layout_cast(jnp.zeros((Q_ROWS,), jnp.float32), rows, interpret),
    )
    acc, row_max, denom = lax.fori_loop(start, stop, attend_block, init)
    nonempty = denom > 0
    safe_denom = jnp.where(nonempty, denom, 1.0)
    o_gmem[b, h, split] = acc / lax.broadcast_in_dim(safe_denom, acc.shape, [0])
    lse_smem[...] = jnp.where(nonempty, row_max + jnp.log(safe_denom), -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[b, h, split])
    plgpu.wait_smem_to_gmem(0)


def combine_splits(out: jax.Array, lse: jax.Array) -> jax.Array:
    """Merge per-split softmax results: ``out`` [B, K, P, G, H], ``lse`` [B, K, P, G]."""
    lse_max = jnp.max(lse, axis=2, keepdims=True)  # [B, K, 1, G]
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    weights = jnp.exp(lse - lse_max)  # [B, K, P, G]; empty splits weigh 0
    total = jnp.sum(weights, axis=2)  # [B, K, G]
    merged = jnp.einsum("BKPG,BKPGH->BKGH", weights, out)
    return merged / jnp.where(total > 0, total, 1.0)[..., None]


def decode_attention_gpu(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    block_k: int,
    num_splits: int,
    interpret: bool = False,
) -> jax.Array:
    """``q`` [B, N, H], caches [B, K, S, H], ``lengths`` [B] in [0, S] -> [B, N, H].

    Inputs are validated by the public wrapper in ``kernel.py``.
    """
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, _, _ = k_cache.shape
    group = num_heads // num_kv_heads
    dtype = q.dtype
    q_tile = q.reshape(batch, num_kv_heads, group, head_dim)  # [B, K, G, H]
    q_tile = jnp.pad(q_tile, ((0, 0), (0, 0), (0, Q_ROWS - group), (0, 0)))  # [B, K, 64, H]
    if interpret:
        k_cache, v_cache = _interpretable_caches(k_cache, v_cache, block_k)

    tile_cols = _SWIZZLE_BYTES // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, tile_cols)), plgpu.SwizzleTransform(_SWIZZLE_BYTES))
    k_tile_shape = (head_dim, block_k) if interpret else (block_k, head_dim)
    out, lse = plgpu.kernel(
        functools.partial(
            _decode_attention_gpu_kernel,
            scale=scale,
            block_k=block_k,
            num_splits=num_splits,
            sliding_window=sliding_window,
            softcap=softcap,
            interpret=interpret,
        ),
        out_type=(
            jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, Q_ROWS, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, Q_ROWS), jnp.float32),
        ),
        scratch_types=(
            plgpu.SMEM((Q_ROWS, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((2, *k_tile_shape), dtype, transforms=transforms),
            plgpu.SMEM((2, block_k, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((Q_ROWS, block_k), dtype, transforms=transforms),
            plgpu.SMEM((Q_ROWS,), jnp.float32),
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
        ),
        grid=(batch, num_kv_heads, num_splits),
        grid_names=("batch", "kv_heads", "splits"),
        kernel_name="decode_attention",
        interpret=_gpu_interpret_params() if interpret else None,
    )(lengths, q_tile, k_cache, v_cache)
    out = combine_splits(out[:, :, :, :group], lse[:, :, :, :group])  # [B, K, G, H]
    return out.reshape(batch, num_heads, head_dim).astype(dtype)


# GPU interpret mode in jax 0.10 knows neither layout hints nor transposed wgmma operands,
# and rejects the partial last TMA box that hardware zero-fills. It therefore gets K
# pre-transposed, caches padded to whole blocks, and skips the (numerically inert)
# layout casts; everything else runs as compiled.
def _layout_cast(x, layout, interpret):
    return x if interpret else plgpu.layout_cast(x, layout)


def _wgmma_iota(shape, dim, interpret):
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _interpretable_caches(k_cache, v_cache, block_k):
    seq_len = k_cache.shape[2]
    pad = ((0, 0), (0, 0), (0, pl.cdiv(seq_len, block_k) * block_k - seq_len), (0, 0))
    k_cache = jnp.pad(k_cache, pad, constant_values=jnp.nan)
    v_cache = jnp.pad(v_cache, pad, constant_values=jnp.nan)
    return jnp.swapaxes(k_cache, 2, 3), v_cache  # K: [B, K, H, S]


def _gpu_interpret_params():
    # Reachable only through jax's private module in jax 0.10 (see rms_norm/gpu.py).
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()
