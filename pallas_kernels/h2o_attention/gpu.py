"""H2O decode attention with attention mass on GPU, with Pallas Triton.

One program per (sequence, kv head) walks the whole candidate axis ``S`` twice in
blocks of ``block_s``: the first pass finds each query row's logit maximum and softmax
denominator, the second recomputes the logits, turns them into the exact probabilities
``exp(logit - max) / denom``, accumulates ``probs @ v`` and stores each block's mass
(the probabilities summed over the kv head's query heads). Recomputing ``q @ k.T``
costs one more read of the keys (L2 hits at H2O's budgets) and keeps the mass and the
output the same probabilities, with no rescaled partial results to merge.

The ``G`` query heads of a kv head are zero-padded to a 16-row dot tile; padding rows
get zero probability. Candidates that are not visible are masked loads (read as 0), so
whatever they hold (NaN too) never reaches the output or the mass.

Constraints: ``H`` a power of two from 16 to 256 and ``block_s`` a power of two of at
least 16 (Triton tiles); the wrapper (``kernel.py``) uses the reference otherwise.

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

from pallax.pallas_kernels.h2o_attention.shared import dot_dtype, precision, visible

TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
MIN_TILE = 16  # smallest M, N and K of a Triton dot
MAX_HEAD_DIM = 256  # the [block_s, H] key and value tiles live in registers
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # [R, H] x [n, H] -> [R, n]


def supports(head_dim: int) -> bool:
    """Whether the Triton kernel covers this head dim (a power of two, 16 to 256)."""
    return MIN_TILE <= head_dim <= MAX_HEAD_DIM and head_dim & (head_dim - 1) == 0


def check_block(block_s: int) -> None:
    if block_s < MIN_TILE or block_s & (block_s - 1):
        raise ValueError(f"{block_s=} must be a power of two >= {MIN_TILE} on GPU (Triton tiles)")


def _h2o_attention_gpu_kernel(
    qpos_ref,  # [B] int32
    q_ref,  # [B, N, H]
    k_ref,  # [B, K, S, H]
    v_ref,  # [B, K, S, H]
    kpos_ref,  # [B, K, S] int32, -1: empty
    o_ref,  # [B, K, R, H] in q's dtype; rows >= G are padding
    mass_ref,  # [B, K, S_pad] float32, S_pad = S rounded up to block_s
    *,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    block_s: int,
    q_rows: int,
):
    b, h = pl.program_id(0), pl.program_id(1)
    num_heads, head_dim = q_ref.shape[1:]
    num_kv_heads, seq_len = k_ref.shape[1:3]
    group = num_heads // num_kv_heads
    qpos = qpos_ref[b]
    rows = jnp.arange(q_rows)  # [R]: query head h * G + row; rows >= G are padding
    cols = jnp.arange(head_dim)
    real_rows = rows < group
    q_at = (b, h * group + rows[:, None], cols[None, :])
    q = plgpu.load(q_ref.at[q_at], mask=real_rows[:, None], other=0)  # [R, H]
    dtype = dot_dtype(q.dtype, k_ref.dtype)
    q = q.astype(dtype)
    num_blocks = pl.cdiv(seq_len, block_s)

    def candidates(j):
        """Block j's slots [n], which are visible [n], and their masked logits [R, n]."""
        slots = j * block_s + jnp.arange(block_s)
        kpos = plgpu.load(kpos_ref.at[b, h, slots], mask=slots < seq_len, other=-1)
        ok = visible(kpos, qpos, sliding_window)
        keys = plgpu.load(k_ref.at[b, h, slots[:, None], cols[None, :]], mask=ok[:, None], other=0)
        logits = lax.dot_general(
            q, keys.astype(dtype), _CONTRACT_LAST, precision=precision(dtype),
            preferred_element_type=jnp.float32,
        ) * scale  # fmt: skip
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        return slots, ok, jnp.where(ok[None, :], logits, -jnp.inf)

    def statistics(j, carry):
        row_max, denom = carry  # [R], [R]
        _, _, logits = candidates(j)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)  # nothing visible yet
        denom = denom * jnp.exp(row_max - safe_max)
        denom += jnp.sum(jnp.exp(logits - safe_max[:, None]), axis=1)
        return new_max, denom

    init = (jnp.full((q_rows,), -jnp.inf, jnp.float32), jnp.zeros((q_rows,), jnp.float32))
    row_max, denom = lax.fori_loop(0, num_blocks, statistics, init)
    row_max = jnp.where(row_max == -jnp.inf, 0.0, row_max)  # no visible key: probs stay 0
    denom = jnp.where(real_rows & (denom > 0), denom, jnp.inf)  # padding rows weigh 0

    def attend(j, acc):
        slots, ok, logits = candidates(j)
        probs = jnp.exp(logits - row_max[:, None]) / denom[:, None]  # [R, n]
        vals = plgpu.load(v_ref.at[b, h, slots[:, None], cols[None, :]], mask=ok[:, None], other=0)
        plgpu.store(mass_ref.at[b, h, slots], jnp.sum(probs, axis=0))
        return acc + jnp.dot(
            probs, vals.astype(jnp.float32), precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )  # fmt: skip

    acc = lax.fori_loop(0, num_blocks, attend, jnp.zeros((q_rows, head_dim), jnp.float32))
    plgpu.store(o_ref.at[b, h, rows[:, None], cols[None, :]], acc.astype(o_ref.dtype))


def h2o_decode_attention_gpu(
    q: jax.Array,
    keys: jax.Array,
    vals: jax.Array,
    kpos: jax.Array,
    qpos: jax.Array,
    *,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    block_s: int,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``q`` [B, N, H] over ``keys``/``vals`` [B, K, S, H] at ``kpos`` [B, K, S] ->
    (``[B, N, H]`` in ``q.dtype``, mass ``[B, K, S]`` float32).

    Inputs are validated by the public wrapper in ``kernel.py``.
    """
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, seq_len, _ = keys.shape
    group = num_heads // num_kv_heads
    q_rows = max(MIN_TILE, pl.next_power_of_2(group))
    padded = pl.cdiv(seq_len, block_s) * block_s
    out, mass = pl.pallas_call(
        functools.partial(
            _h2o_attention_gpu_kernel,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            block_s=block_s,
            q_rows=q_rows,
        ),
        out_shape=(
            jax.ShapeDtypeStruct((batch, num_kv_heads, q_rows, head_dim), q.dtype),
            jax.ShapeDtypeStruct((batch, num_kv_heads, padded), jnp.float32),
        ),
        grid=(batch, num_kv_heads),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="h2o_decode_attention",
    )(qpos, q, keys, vals, kpos)
    out = out[:, :, :group].reshape(batch, num_heads, head_dim)
    return out, mass[:, :, :seq_len]
