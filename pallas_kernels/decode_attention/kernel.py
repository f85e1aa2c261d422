"""Decode attention as a Pallas kernel: Mosaic TPU (this file) and Mosaic GPU (``gpu.py``).

One query per sequence attends to a dense KV cache ``[B, K, S, H]``. The TPU
grid is (sequence, kv head, key block); the key-block axis runs an online
softmax in float32 VMEM scratch. ``lengths`` is scalar-prefetched so the K/V
index maps clamp the key-block index into ``[first, stop)``, the blocks that
hold attended keys: grid steps outside it revisit the block already in VMEM
(no DMA) and skip their compute with ``pl.when``.

TPU blocks are ``[block_k, H]`` with ``H`` the full head dim (any size;
multiples of 128 fill the lanes) and ``block_k`` a multiple of 128 or the whole
cache. ``S`` need not be a multiple of ``block_k``: the partial last block's
out-of-range rows are masked like any unattended slot.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallax.pallas_kernels.decode_attention import gpu
from pallax.pallas_kernels.decode_attention.key_range import block_range, key_range
from pallax.pallas_kernels.platforms import resolve_platform

_TPU_LANES = 128
_GPU_TILE = 64
_TARGET_GPU_CTAS = 132  # one wave on an H100 SXM
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # [G, H] x [block_k, H] -> [G, block_k]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Key-axis tiling.

    block_k: keys per block. TPU: a multiple of 128, or at least ``S`` (one block
      covering the cache). GPU: a multiple of 64, at most 256.
    num_splits: GPU only, key-axis splits run by separate CTAs (FlashDecoding);
      None picks enough to fill the GPU for small ``B * K``.
    """

    block_k: int
    num_splits: int | None = None

    def __post_init__(self):
        if self.block_k < 1:
            raise ValueError(f"{self.block_k=} must be positive")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"{self.num_splits=} must be positive")

    @classmethod
    def get_default(cls, platform: str = "tpu", *, head_dim: int = 128) -> BlockSizes:
        if platform == "tpu":
            return cls(block_k=512)
        # GPU: double-buffered K and V blocks plus the q and p tiles must fit in SMEM.
        return cls(block_k=128 if head_dim <= 128 else 64)


def _decode_attention_kernel(
    lengths_ref,  # [B] int32, scalar-prefetched into SMEM
    q_ref,  # [G, H]
    k_ref,  # [block_k, H]
    v_ref,  # [block_k, H]
    o_ref,  # [G, H]
    max_ref,  # [G, 1] float32 scratch: running max of the logits
    denom_ref,  # [G, 1] float32 scratch: running softmax denominator
    acc_ref,  # [G, H] float32 scratch: running unnormalised output
    *,
    scale: float,
    block_k: int,
    sliding_window: int | None,
    softcap: float | None,
):
    b, i = pl.program_id(0), pl.program_id(2)
    lo, hi = key_range(lengths_ref[b], sliding_window)
    first, stop = block_range(lo, hi, block_k)

    @pl.when(i == 0)
    def _init():
        max_ref[...] = jnp.full_like(max_ref, -jnp.inf)
        denom_ref[...] = jnp.zeros_like(denom_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((i >= first) & (i < stop))
    def _attend_block():
        q = q_ref[...]  # [G, H]
        k = k_ref[...]  # [block_k, H]
        logits = lax.dot_general(q, k, _CONTRACT_LAST, preferred_element_type=jnp.float32)
        logits = logits * scale  # [G, block_k]
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        pos = i * block_k + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        logits = jnp.where((pos >= lo) & (pos < hi), logits, -jnp.inf)
        # The block holds at least one valid key, so new_max is finite.
        prev_max = max_ref[...]  # [G, 1]
        new_max = jnp.maximum(prev_max, jnp.max(logits, axis=1, keepdims=True))
        alpha = jnp.exp(prev_max - new_max)  # [G, 1]
        probs = jnp.exp(logits - new_max)  # [G, block_k]
        denom_ref[...] = alpha * denom_ref[...] + jnp.sum(probs, axis=1, keepdims=True)
        max_ref[...] = new_max

        v = v_ref[...]
        v_pos = i * block_k + lax.broadcasted_iota(jnp.int32, v.shape, 0)  # [block_k, H]
        # Slots outside [lo, hi) may hold NaN, and 0 * NaN would poison probs @ v.
        v = jnp.where((v_pos >= lo) & (v_pos < hi), v, jnp.zeros_like(v))
        update = jnp.dot(probs.astype(v.dtype), v, preferred_element_type=jnp.float32)  # [G, H]
        acc_ref[...] = alpha * acc_ref[...] + update

    @pl.when(i == pl.num_programs(2) - 1)
    def _finalize():
        denom = denom_ref[...]
        out = acc_ref[...] / jnp.where(denom > 0, denom, 1.0)
        o_ref[...] = out.astype(o_ref.dtype)


def _decode_attention_tpu(
    q, k_cache, v_cache, lengths, *, scale, sliding_window, softcap, block_k, interpret
):
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, seq_len, _ = k_cache.shape
    group = num_heads // num_kv_heads
    block_k = min(block_k, seq_len)
    num_blocks = pl.cdiv(seq_len, block_k)
    q = q.reshape(batch, num_kv_heads, group, head_dim)  # [B, K, G, H]

    def kv_index(b, h, i, lengths_ref):
        first, stop = block_range(*key_range(lengths_ref[b], sliding_window), block_k)
        return b, h, jnp.clip(i, first, jnp.maximum(stop - 1, first)), 0

    qo_spec = pl.BlockSpec((None, None, group, head_dim), lambda b, h, i, _: (b, h, 0, 0))
    kv_spec = pl.BlockSpec((None, None, block_k, head_dim), kv_index)
    out = pl.pallas_call(
        functools.partial(
            _decode_attention_kernel,
            scale=scale,
            block_k=block_k,
            sliding_window=sliding_window,
            softcap=softcap,
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, num_kv_heads, num_blocks),
            in_specs=[qo_spec, kv_spec, kv_spec],
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
        name="decode_attention",
    )(lengths, q, k_cache, v_cache)
    return out.reshape(batch, num_heads, head_dim)


def _check_inputs(q, k_cache, v_cache, lengths, sliding_window, softcap):
    if q.ndim != 3 or k_cache.ndim != 4:
        raise ValueError(
            f"q.shape={q.shape} must be [B, N, H], k_cache.shape={k_cache.shape} [B, K, S, H]"
        )
    batch, num_heads, head_dim = q.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache.shape={v_cache.shape} must equal k_cache.shape={k_cache.shape}")
    k_batch, num_kv_heads, _, k_head_dim = k_cache.shape
    if (k_batch, k_head_dim) != (batch, head_dim):
        raise ValueError(f"k_cache.shape={k_cache.shape} does not match q.shape={q.shape} on B, H")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} must be divisible by {num_kv_heads=}")
    if lengths.shape != (batch,) or lengths.dtype != jnp.int32:
        raise ValueError(f"lengths ({lengths.shape}, {lengths.dtype}) must be int32 [{batch}]")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"dtypes differ: {q.dtype=} {k_cache.dtype=} {v_cache.dtype=}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{sliding_window=} must be positive or None")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"{softcap=} must be positive or None")


def _check_gpu(q, k_cache, block_sizes):
    head_dim = q.shape[-1]
    group = q.shape[1] // k_cache.shape[1]
    if q.dtype not in gpu.SUPPORTED_DTYPES:
        raise NotImplementedError(f"{q.dtype=} is not supported on Mosaic GPU (float16, bfloat16)")
    if head_dim % _GPU_TILE or head_dim > gpu.MAX_TILE:
        raise ValueError(
            f"{head_dim=} must be a multiple of {_GPU_TILE} up to {gpu.MAX_TILE} on GPU"
        )
    if block_sizes.block_k % _GPU_TILE or block_sizes.block_k > gpu.MAX_TILE:
        raise ValueError(
            f"{block_sizes.block_k=} must be a multiple of {_GPU_TILE} up to {gpu.MAX_TILE} on GPU"
        )
    smem_bytes = gpu.smem_bytes(head_dim, block_sizes.block_k, q.dtype)
    if smem_bytes > gpu.SMEM_BUDGET:
        raise ValueError(
            f"{block_sizes.block_k=} with {head_dim=} needs {smem_bytes=} of shared memory, over"
            f" {gpu.SMEM_BUDGET}; use a smaller block_k"
        )
    if group > gpu.Q_ROWS:
        raise ValueError(f"{group=} query heads per kv head must be at most {gpu.Q_ROWS} on GPU")


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """Single-query grouped-query attention over a dense KV cache (one decode step).

    Same contract as ``decode_attention_reference``: ``q`` [B, N, H], caches
    [B, K, S, H], ``lengths`` [B] int32; slots outside each sequence's key range
    never reach the output, even when they hold NaN.

    Args:
      block_sizes: key tiling, ``BlockSizes.get_default(platform, head_dim=H)`` if None.
      interpret: run the kernel in Pallas interpret mode (on CPU).
      platform: "tpu" (Mosaic TPU) or "cuda" (Mosaic GPU, sm90+, float16/bfloat16);
        None picks the default backend's (on CPU with ``interpret``: the TPU
        kernel). Pass it explicitly when exporting for another platform.

    Returns:
      ``[B, N, H]`` in ``q.dtype``.
    """
    _check_inputs(q, k_cache, v_cache, lengths, sliding_window, softcap)
    platform = resolve_platform(platform, interpret)
    block_sizes = block_sizes or BlockSizes.get_default(platform, head_dim=q.shape[-1])
    batch, num_kv_heads, seq_len, _ = k_cache.shape
    lengths = jnp.clip(lengths, 0, seq_len)
    static = dict(
        scale=float(scale),
        sliding_window=None if sliding_window is None else int(sliding_window),
        softcap=None if softcap is None else float(softcap),
    )
    if platform == "cuda":
        _check_gpu(q, k_cache, block_sizes)
        num_blocks = pl.cdiv(seq_len, block_sizes.block_k)
        num_splits = block_sizes.num_splits or pl.cdiv(_TARGET_GPU_CTAS, batch * num_kv_heads)
        return gpu.decode_attention_gpu(
            q,
            k_cache,
            v_cache,
            lengths,
            block_k=block_sizes.block_k,
            num_splits=min(num_splits, num_blocks),
            interpret=interpret,
            **static,
        )
    block_k = block_sizes.block_k
    if block_k < seq_len and block_k % _TPU_LANES:
        raise ValueError(
            f"{block_k=} must be a multiple of {_TPU_LANES} on TPU when it is below {seq_len=}"
        )
    return _decode_attention_tpu(
        q, k_cache, v_cache, lengths, block_k=block_k, interpret=interpret, **static
    )
