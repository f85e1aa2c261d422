"""Paged decode attention on GPU, with Pallas Triton.

One program per (sequence, kv head) walks the pages of its key range in order with an
online softmax: each step reads the page id from the block table, loads that page's
``[page, H]`` keys and values where they lie in the pool, and folds them in. The ``G``
query heads of a kv head are zero-padded to a 16-row dot tile; positions outside the
key range are masked loads (read as 0) and get zero probability.

Constraints (``CONSTRAINTS``): pages of a power of two of at least 16 tokens and ``H`` a
power of two from 16 to 256 (Triton tiles). Exporting the Triton custom call needs
``export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallax.pallas_kernels.decode_attention.key_range import block_range, key_range
from pallax.pallas_kernels.h2o_attention.gpu import MIN_TILE
from pallax.pallas_kernels.h2o_attention.gpu import supports as head_dim_fits
from pallax.pallas_kernels.h2o_attention.shared import dot_dtype, precision

CONSTRAINTS = "pages of a power of two >= 16 tokens and a head dim a power of two 16..256"
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # [R, H] x [page, H] -> [R, page]


def supports(page: int, head_dim: int) -> bool:
    return page >= MIN_TILE and page & (page - 1) == 0 and head_dim_fits(head_dim)


def _paged_gpu_kernel(
    lengths_ref,  # [B] int32
    table_ref,  # [B, n] int32
    q_ref,  # [B, N, H]
    k_ref,  # [P, K, page, H]
    v_ref,  # [P, K, page, H]
    o_ref,  # [B, K, R, H]; rows >= G are padding
    *,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    q_rows: int,
):
    b, h = pl.program_id(0), pl.program_id(1)
    num_heads, head_dim = q_ref.shape[1:]
    num_pages, num_kv_heads, page = k_ref.shape[:3]
    group = num_heads // num_kv_heads
    lo, hi = key_range(plgpu.load(lengths_ref.at[b]), sliding_window)
    first, stop = block_range(lo, hi, page)
    rows, cols, offs = jnp.arange(q_rows), jnp.arange(head_dim), jnp.arange(page)
    real_rows = rows < group
    q = plgpu.load(q_ref.at[b, h * group + rows[:, None], cols[None, :]],
                   mask=real_rows[:, None], other=0)  # fmt: skip
    dtype = dot_dtype(q.dtype, k_ref.dtype)
    q = q.astype(dtype)

    def fold(j, carry):
        row_max, denom, acc = carry
        at = jnp.clip(plgpu.load(table_ref.at[b, j]), 0, num_pages - 1)
        slots = j * page + offs
        ok = (slots >= lo) & (slots < hi)
        keys = plgpu.load(k_ref.at[at, h, offs[:, None], cols[None, :]], mask=ok[:, None], other=0)
        logits = lax.dot_general(
            q, keys.astype(dtype), _CONTRACT_LAST, precision=precision(dtype),
            preferred_element_type=jnp.float32,
        ) * scale  # fmt: skip
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        logits = jnp.where(ok[None, :], logits, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        safe = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        alpha = jnp.exp(row_max - safe)
        probs = jnp.exp(logits - safe[:, None])
        vals = plgpu.load(v_ref.at[at, h, offs[:, None], cols[None, :]], mask=ok[:, None], other=0)
        acc = acc * alpha[:, None] + jnp.dot(
            probs, vals.astype(jnp.float32), precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        return new_max, denom * alpha + jnp.sum(probs, axis=1), acc

    init = (
        jnp.full((q_rows,), -jnp.inf, jnp.float32),
        jnp.zeros((q_rows,), jnp.float32),
        jnp.zeros((q_rows, head_dim), jnp.float32),
    )
    _, denom, acc = lax.fori_loop(first, stop, fold, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[:, None]
    plgpu.store(o_ref.at[b, h, rows[:, None], cols[None, :]], out.astype(o_ref.dtype))


def paged_decode_attention_gpu(
    q, k_pages, v_pages, block_table, lengths, *, scale, sliding_window, softcap, interpret
):
    """Inputs validated by ``kernel.paged_decode_attention``."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[1]
    group = num_heads // num_kv_heads
    q_rows = max(MIN_TILE, pl.next_power_of_2(group))
    out = pl.pallas_call(
        functools.partial(
            _paged_gpu_kernel,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            q_rows=q_rows,
        ),
        out_shape=jax.ShapeDtypeStruct((batch, num_kv_heads, q_rows, head_dim), q.dtype),
        grid=(batch, num_kv_heads),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="paged_decode_attention",
    )(lengths, block_table, q, k_pages, v_pages)
    return out[:, :, :group].reshape(batch, num_heads, head_dim)
