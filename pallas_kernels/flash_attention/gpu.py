"""Prefill attention on GPU with Pallas Triton (FlashAttention-2).

One program per (sequence, kv head, query block). Its rows are the block's queries
times the kv head's ``G`` query heads (padded to ``Gp``, the next power of two, so that
a row's query and head are a shift and a mask): the keys and values are loaded once per
kv head (GQA without repeating them). The program walks only the key blocks its
queries see (causal, after a window's start) with an online softmax in float32, and
writes the normalised output straight into ``[B, T, N, H]``. With candidates (keys at
explicit positions ``kpos``, in any order) it walks every key block and masks by the
positions it loads.

Loads of slots no query of the block sees are masked (read as 0), so whatever those
slots hold (NaN too) never reaches the output; padding rows are masked on load and
store.

Constraints: ``H`` a power of two from 16 to 256, float32 / bfloat16 / float16,
``block_q`` and ``block_k`` powers of two with ``block_q * Gp >= 16`` and
``block_k >= 16`` (Triton's dot tiles); the lowering uses the reference otherwise.

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

from pallax.pallas_kernels.flash_attention.reference import visible

TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
MIN_TILE = 16  # smallest M, N and K of a Triton dot
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # [R, H] x [block_k, H] -> [R, block_k]


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(head_dim: int, dtype) -> bool:
    """Whether the Triton kernel covers this head dim and dtype."""
    return (MIN_TILE <= head_dim <= MAX_HEAD_DIM and _pow2(head_dim)
            and jnp.dtype(dtype) in SUPPORTED_DTYPES)  # fmt: skip


def padded_group(group: int) -> int:
    return pl.next_power_of_2(group)


def check(q_shape, k_shape, dtype, block_q: int, block_k: int) -> None:
    head_dim, group = q_shape[-1], q_shape[2] // k_shape[1]
    if not supports(head_dim, dtype):
        raise ValueError(
            f"{head_dim=} with {jnp.dtype(dtype)} is not covered on GPU: the head dim must be a"
            f" power of two from {MIN_TILE} to {MAX_HEAD_DIM}, the dtype one of"
            f" {[str(d) for d in SUPPORTED_DTYPES]}"
        )
    if not _pow2(block_q) or block_q * padded_group(group) < MIN_TILE:
        raise ValueError(
            f"{block_q=} must be a power of two with block_q * {padded_group(group)} (the padded"
            f" query group) >= {MIN_TILE} on GPU"
        )
    if not _pow2(block_k) or block_k < MIN_TILE:
        raise ValueError(f"{block_k=} must be a power of two >= {MIN_TILE} on GPU (Triton tiles)")


def _flash_attention_gpu_kernel(
    pos_ref,  # [B] int32
    q_ref,  # [B, T, N, H]
    k_ref,  # [B, K, S, H]
    v_ref,  # [B, K, S, H]
    *refs,  # candidates: kpos [B, K or 1, S] int32; then o_ref [B, T, N, H]
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    block_q: int,
    block_k: int,
    group_pad: int,
    candidates: bool,
):
    kpos_ref, o_ref = refs if candidates else (None, *refs)
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t_len, num_heads, head_dim = q_ref.shape[1:]
    seq_len = k_ref.shape[2]
    group = num_heads // k_ref.shape[1]
    rows = jnp.arange(block_q * group_pad)
    g = rows % group_pad
    t = j * block_q + rows // group_pad  # [R]: each row's query index
    real = (g < group) & (t < t_len)
    cols = jnp.arange(head_dim)
    at = (b, t[:, None], h * group + g[:, None], cols[None, :])
    q = plgpu.load(q_ref.at[at], mask=real[:, None], other=0)  # [R, H]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    p = pos_ref[b]
    q_pos = p + t  # [R]
    q_lo = p + j * block_q
    lo = 0 if sliding_window is None else jnp.maximum(q_lo - sliding_window + 1, 0)
    hi = p + jnp.minimum((j + 1) * block_q, t_len)  # past the last real query's position
    if candidates:  # unordered keys: every block, each key's position read
        first, stop = 0, pl.cdiv(seq_len, block_k)
        kh = h if kpos_ref.shape[1] > 1 else 0
    else:
        hi = jnp.minimum(hi, seq_len)
        first = lo // block_k
        stop = jnp.maximum((hi + block_k - 1) // block_k, first)

    def attend(i, carry):
        row_max, denom, acc = carry
        slots = i * block_k + jnp.arange(block_k)
        kp = slots
        if candidates:
            kp = plgpu.load(kpos_ref.at[b, kh, slots], mask=slots < seq_len, other=-1)
        seen = (kp >= lo) & (kp < hi) & (slots < seq_len)
        kv_at = (b, h, slots[:, None], cols[None, :])
        keys = plgpu.load(k_ref.at[kv_at], mask=seen[:, None], other=0)
        logits = lax.dot_general(q, keys, _CONTRACT_LAST, precision=precision,
                                 preferred_element_type=jnp.float32) * scale  # fmt: skip
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        ok = visible(q_pos[:, None], kp[None, :], None, sliding_window) & seen[None, :]
        logits = jnp.where(ok, logits, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)  # a row that saw nothing yet
        alpha = jnp.exp(row_max - safe_max)
        probs = jnp.exp(logits - safe_max[:, None])
        vals = plgpu.load(v_ref.at[kv_at], mask=seen[:, None], other=0)
        update = jnp.dot(probs.astype(vals.dtype), vals, precision=precision,
                         preferred_element_type=jnp.float32)  # fmt: skip
        return new_max, alpha * denom + jnp.sum(probs, axis=1), alpha[:, None] * acc + update

    num_rows = block_q * group_pad
    init = (jnp.full((num_rows,), -jnp.inf, jnp.float32), jnp.zeros((num_rows,), jnp.float32),
            jnp.zeros((num_rows, head_dim), jnp.float32))  # fmt: skip
    _, denom, acc = lax.fori_loop(first, stop, attend, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[:, None]
    plgpu.store(o_ref.at[at], out.astype(o_ref.dtype), mask=real[:, None])


def flash_attention_gpu(q, k_cache, v_cache, pos, kpos, *, scale, sliding_window, softcap, block_q,
                        block_k, interpret=False):  # fmt: skip
    """``q`` [B, T, N, H] over the caches [B, K, S, H] (or candidates at ``kpos``) ->
    ``[B, T, N, H]`` in ``q.dtype``.

    Inputs are validated by the public wrapper in ``kernel.py``.
    """
    batch, t, _, _ = q.shape
    num_kv_heads = k_cache.shape[1]
    group_pad = padded_group(q.shape[2] // num_kv_heads)
    # A short chunk takes a smaller query block, keeping the dot's 16 rows.
    block_q = min(block_q, max(pl.next_power_of_2(t), pl.cdiv(MIN_TILE, group_pad)))
    return pl.pallas_call(
        functools.partial(
            _flash_attention_gpu_kernel,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            block_q=block_q,
            block_k=block_k,
            group_pad=group_pad,
            candidates=kpos is not None,
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(batch, num_kv_heads, pl.cdiv(t, block_q)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="flash_attention",
    )(pos, q, k_cache, v_cache, *([] if kpos is None else [kpos]))
