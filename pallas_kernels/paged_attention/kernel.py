"""Paged decode attention as a Pallas kernel: Mosaic TPU (this file) and Triton on CUDA
(``gpu.py``).

One query per sequence attends to its positions in a pool of pages ``[P, K, page, H]``
through its block table ``[B, n]`` (vLLM's PagedAttention): position ``p`` is row
``p % page`` of page ``block_table[b, p // page]``. No dense copy of a sequence's cache
is made; each page is read where it lies.

TPU: the dense decode kernel's grid and online softmax (``decode_attention.kernel``)
with the page as the key block: grid (sequence, kv head, page), the lengths and the
block table scalar-prefetched, and the K/V index maps reading the page id from the
table, so the pipeline DMAs exactly the pages a sequence attends (pages outside its key
range revisit the block already in VMEM and skip their compute). Blocks are
``[page, H]``: ``page`` a multiple of 8 (16 for 16-bit caches), ``H`` the full head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallax.pallas_kernels.decode_attention.kernel import _decode_attention_kernel
from pallax.pallas_kernels.decode_attention.key_range import block_range, key_range
from pallax.pallas_kernels.paged_attention import gpu
from pallax.pallas_kernels.platforms import resolve_platform

TPU_CONSTRAINTS = "pages of a multiple of 8 tokens (16 for 16-bit caches)"


def supports(platform: str, page: int, head_dim: int, dtype) -> bool:
    """Whether the kernel covers pages of ``page`` tokens, this head dim and cache dtype."""
    if platform == "cuda":
        return gpu.supports(page, head_dim)
    sublanes = 16 if jnp.dtype(dtype).itemsize == 2 else 8
    return page % sublanes == 0


def _paged_kernel(lengths_ref, table_ref, *refs, **static):
    del table_ref  # read by the K/V index maps
    _decode_attention_kernel(lengths_ref, *refs, **static)


def _paged_tpu(q, k_pages, v_pages, block_table, lengths, *, interpret, **static):
    batch, num_heads, head_dim = q.shape
    num_pages, num_kv_heads, page, _ = k_pages.shape
    group = num_heads // num_kv_heads
    q = q.reshape(batch, num_kv_heads, group, head_dim)  # [B, K, G, H]
    window = static["sliding_window"]

    def kv_index(b, h, i, lengths_ref, table_ref):
        first, stop = block_range(*key_range(lengths_ref[b], window), page)
        i = jnp.clip(i, first, jnp.maximum(stop - 1, first))
        # an entry the sequence never reads may hold any id: keep the DMA in the pool
        return jnp.clip(table_ref[b, i], 0, num_pages - 1), h, 0, 0

    qo_spec = pl.BlockSpec((None, None, group, head_dim), lambda b, h, i, *_: (b, h, 0, 0))
    kv_spec = pl.BlockSpec((None, None, page, head_dim), kv_index)
    out = pl.pallas_call(
        functools.partial(_paged_kernel, block_k=page, **static),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, num_kv_heads, block_table.shape[1]),
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
        name="paged_decode_attention",
    )(lengths, block_table, q, k_pages, v_pages)
    return out.reshape(batch, num_heads, head_dim)


def _check_inputs(q, k_pages, v_pages, block_table, lengths):
    if q.ndim != 3 or k_pages.ndim != 4 or block_table.ndim != 2:
        raise ValueError(
            f"q.shape={q.shape} must be [B, N, H], k_pages.shape={k_pages.shape} [P, K, page, H]"
            f", block_table.shape={block_table.shape} [B, n]"
        )
    batch, num_heads, head_dim = q.shape
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages.shape={v_pages.shape} must equal k_pages.shape={k_pages.shape}")
    num_kv_heads = k_pages.shape[1]
    if k_pages.shape[3] != head_dim or num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"k_pages.shape={k_pages.shape} does not fit q.shape={q.shape}")
    if block_table.shape[0] != batch or block_table.dtype != jnp.int32:
        raise ValueError(
            f"block_table ({block_table.shape}, {block_table.dtype}) must be int32 [{batch}, n]"
        )
    if lengths.shape != (batch,) or lengths.dtype != jnp.int32:
        raise ValueError(f"lengths ({lengths.shape}, {lengths.dtype}) must be int32 [{batch}]")
    if not q.dtype == k_pages.dtype == v_pages.dtype:
        raise ValueError(f"dtypes differ: {q.dtype=} {k_pages.dtype=} {v_pages.dtype=}")


def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_table: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    interpret: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """Single-query grouped-query attention over a paged KV cache (one decode step).

    Same contract as ``paged_decode_attention_reference``. ``platform``: "tpu" (Mosaic
    TPU) or "cuda" (Triton); None picks the default backend's (on CPU with ``interpret``:
    the TPU kernel). ``supports`` says which page sizes and head dims each covers.

    Returns:
      ``[B, N, H]`` in ``q.dtype``.
    """
    _check_inputs(q, k_pages, v_pages, block_table, lengths)
    platform = resolve_platform(platform, interpret)
    page, head_dim = k_pages.shape[2], q.shape[2]
    if not supports(platform, page, head_dim, k_pages.dtype):
        need = gpu.CONSTRAINTS if platform == "cuda" else TPU_CONSTRAINTS
        raise ValueError(
            f"pages of {page} tokens with head_dim={head_dim} ({k_pages.dtype}) have no "
            f"{platform} kernel: it takes {need}"
        )
    lengths = jnp.clip(lengths, 0, block_table.shape[1] * page)
    static = dict(
        scale=float(scale),
        sliding_window=None if sliding_window is None else int(sliding_window),
        softcap=None if softcap is None else float(softcap),
    )
    if platform == "cuda":
        return gpu.paged_decode_attention_gpu(
            q, k_pages, v_pages, block_table, lengths, interpret=interpret, **static
        )
    return _paged_tpu(q, k_pages, v_pages, block_table, lengths, interpret=interpret, **static)
