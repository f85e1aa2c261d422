"""KIVI decode attention on GPU with Pallas Triton, FlashDecoding style.

One program per (sequence, kv head, split). Splits ``0 .. P-1`` share the blocks
of packed tokens that hold attended quantized positions; split ``P`` takes the
full-precision rows (the ring, and ``first`` with ``full_first``). Each walks its
blocks with an online softmax in float32 and writes a normalised partial output
and its log-sum-exp, which ``combine_splits`` merges.

The packed bytes are never unpacked into one ``[block_s, H]`` tile: with the
strided layout, bits ``[m*b, (m+1)*b)`` of a token's bytes are channels
``[m*W, (m+1)*W)`` (``W = H * b / 8``), so the kernel keeps ``8 / b`` planes of
``W`` channels: the query, the scales, the zero points and the output are read
or written per plane, and both dots sum or run per plane. Every byte is loaded
once; per-group scales are gathered per token and channel (L1 hits).

The ``G`` query heads that share a kv head are zero-padded to a 16-row dot tile.
Constraints: ``H`` a power of two with ``W >= 16`` (Triton tiles; else the wrapper
uses the reference) and ``block_s`` a power of two of at least 16. Tokens, ring
slots and query rows past the array edges are masked, so nothing is padded.

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

from pallax.pallas_kernels.decode_attention.gpu import combine_splits
from pallax.pallas_kernels.kivi_attention.bounds import (
    FIRST_PARTS,
    PARTS,
    block_range,
    bounds,
    first_attended,
    ring_attended,
    ring_positions,
)

TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
MIN_TILE = 16  # smallest M, N and K of a Triton dot
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # [M, W] x [N, W] -> [M, N]


def check_block(block_s: int) -> None:
    if block_s < MIN_TILE or block_s & (block_s - 1):
        raise ValueError(f"{block_s=} must be a power of two >= {MIN_TILE} on GPU (Triton tiles)")


def _kivi_gpu_kernel(
    lengths_ref,  # [B] int32
    q_ref,  # [B, N, H]
    kd_ref,  # [B, K, S, W] uint8
    ks_ref,  # [B, K, S/G, H]
    kz_ref,  # [B, K, S/G, H]
    kr_ref,  # [B, K, C, H]
    vd_ref,  # [B, K, S, W] uint8
    vs_ref,  # [B, K, S, H/G]
    vz_ref,  # [B, K, S, H/G]
    vr_ref,  # [B, K, C, H]
    *rest,  # ([B, K, F, H] k.first, v.first with full_first), o_ref, lse_ref
    bits: int,
    group_size: int,
    residual: int,
    full_first: int,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    block_s: int,
    q_rows: int,
    num_splits: int,
):
    firsts, (o_ref, lse_ref) = rest[:-2], rest[-2:]
    # o_ref [B, K, P+1, q_rows, H] float32, each split normalised by its own sum;
    # lse_ref [B, K, P+1, q_rows] float32, the log-sum-exp of each split's logits.
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_heads, head_dim = q_ref.shape[1:]
    _, num_kv_heads, seq_len, width = kd_ref.shape
    group = num_heads // num_kv_heads
    per = 8 // bits
    length = lengths_ref[b]
    lo, nq, packed_lo, packed_hi = bounds(
        length, group_size=group_size, residual=residual, sliding_window=sliding_window,
        full_first=full_first, seq_len=seq_len,
    )  # fmt: skip
    rows = jnp.arange(q_rows)  # [R]: query heads h * group + row, rows >= group are padding
    cols = jnp.arange(width)
    planes = [m * width + cols for m in range(per)]  # the channels of each plane, [W]
    q_at = (b, h * group + rows[:, None])
    q = [
        plgpu.load(q_ref.at[q_at + (c[None, :],)], mask=(rows < group)[:, None], other=0)
        for c in planes
    ]  # each [R, W]
    dtype = q[0].dtype
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None

    def attend(carry, keys, values, ok):
        """One online-softmax step over n rows: per-plane ``keys``, ``values`` [n, W]."""
        acc, row_max, denom = carry  # per-plane [R, W], [R], [R]
        logits = sum(
            lax.dot_general(
                qm, km.astype(dtype), _CONTRACT_LAST, precision=precision,
                preferred_element_type=jnp.float32,
            )
            for qm, km in zip(q, keys, strict=True)
        ) * scale  # fmt: skip  # [R, n]
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        logits = jnp.where(ok[None, :], logits, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)  # nothing attended yet
        alpha = jnp.exp(row_max - safe_max)  # [R]
        probs = jnp.exp(logits - safe_max[:, None])  # [R, n]
        denom = denom * alpha + jnp.sum(probs, axis=1)
        probs = probs.astype(dtype)
        acc = tuple(
            a * alpha[:, None]
            + jnp.dot(probs, vm.astype(dtype), precision=precision,
                      preferred_element_type=jnp.float32)
            for a, vm in zip(acc, values, strict=True)
        )  # fmt: skip
        return acc, new_max, denom

    def packed_step(j, carry):
        toks = j * block_s + jnp.arange(block_s)  # [n]
        ok = (toks >= packed_lo) & (toks < packed_hi)
        mask = ok[:, None]
        at = (b, h, toks[:, None])

        def load(ref, channels):  # masked rows read 0, so unattended rows dequantize to 0
            return plgpu.load(ref.at[at + (channels[None, :],)], mask=mask, other=0)

        k_bytes = load(kd_ref, cols).astype(jnp.int32)  # [n, W], uint8 zero-extends
        v_bytes = load(vd_ref, cols).astype(jnp.int32)
        k_group = (b, h, lax.div(toks, group_size)[:, None])
        keys, values = [], []
        for m, c in enumerate(planes):
            shift, low = m * bits, (1 << bits) - 1
            k_scale = plgpu.load(ks_ref.at[k_group + (c[None, :],)], mask=mask, other=0)
            k_zero = plgpu.load(kz_ref.at[k_group + (c[None, :],)], mask=mask, other=0)
            k_vals = ((k_bytes >> shift) & low).astype(jnp.float32)
            keys.append(k_vals * k_scale.astype(jnp.float32) + k_zero.astype(jnp.float32))
            v_group = lax.div(c, group_size)
            v_vals = ((v_bytes >> shift) & low).astype(jnp.float32)
            v_scale = load(vs_ref, v_group).astype(jnp.float32)
            values.append(v_vals * v_scale + load(vz_ref, v_group).astype(jnp.float32))
        return attend(carry, keys, values, ok)

    def full_step(k_ref, v_ref, attended):
        size = k_ref.shape[2]

        def step(j, carry):
            slots = j * block_s + jnp.arange(block_s)  # [n]
            ok = (slots < size) & attended(slots)
            at = (b, h, slots[:, None])
            keys, values = [], []
            for c in planes:
                at_c = at + (c[None, :],)
                keys.append(plgpu.load(k_ref.at[at_c], mask=ok[:, None], other=0))
                values.append(plgpu.load(v_ref.at[at_c], mask=ok[:, None], other=0))
            return attend(carry, keys, values, ok)

        return step

    init = (
        tuple(jnp.zeros((q_rows, width), jnp.float32) for _ in planes),
        jnp.full((q_rows,), -jnp.inf, jnp.float32),
        jnp.zeros((q_rows,), jnp.float32),
    )
    first, stop = block_range(packed_lo, packed_hi, block_s)
    per_split = lax.div(stop - first + num_splits - 1, num_splits)
    start = first + split * per_split
    full = split == num_splits  # the last program takes the full-precision rows
    stop = jnp.where(full, start, jnp.minimum(start + per_split, stop))
    carry = lax.fori_loop(start, stop, packed_step, init)
    ring = kr_ref.shape[2]
    ring_step = full_step(
        kr_ref, vr_ref, lambda slot: ring_attended(ring_positions(slot, length, ring), lo, nq)
    )
    carry = lax.fori_loop(0, jnp.where(full, pl.cdiv(ring, block_s), 0), ring_step, carry)
    if firsts:
        first_step = full_step(*firsts, lambda j: first_attended(j, lo, nq, full_first))
        num_first = jnp.where(full, pl.cdiv(full_first, block_s), 0)
        carry = lax.fori_loop(0, num_first, first_step, carry)

    acc, row_max, denom = carry
    nonempty = denom > 0
    safe_denom = jnp.where(nonempty, denom, 1.0)
    out_at = (b, h, split, rows[:, None])
    for a, c in zip(acc, planes, strict=True):
        plgpu.store(o_ref.at[out_at + (c[None, :],)], a / safe_denom[:, None])
    lse = jnp.where(nonempty, row_max + jnp.log(safe_denom), -jnp.inf)
    plgpu.store(lse_ref.at[b, h, split, rows], lse)


def kivi_decode_attention_gpu(
    q: jax.Array,
    state: dict[str, jax.Array],
    lengths: jax.Array,
    *,
    bits: int,
    group_size: int,
    residual: int,
    full_first: int,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    block_s: int,
    num_splits: int,
    interpret: bool = False,
) -> jax.Array:
    """``q`` [B, N, H], a KIVI cache, ``lengths`` [B] (>= 0) -> [B, N, H] in ``q.dtype``.

    Inputs are validated by the public wrapper in ``kernel.py``.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = state["k.data"].shape[1]
    group = num_heads // num_kv_heads
    q_rows = max(MIN_TILE, pl.next_power_of_2(group))
    parts = PARTS + (FIRST_PARTS if full_first else ())
    programs = num_splits + 1  # the last one reads the full-precision rows
    out, lse = pl.pallas_call(
        functools.partial(
            _kivi_gpu_kernel,
            bits=bits,
            group_size=group_size,
            residual=residual,
            full_first=full_first,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            block_s=block_s,
            q_rows=q_rows,
            num_splits=num_splits,
        ),
        out_shape=(
            jax.ShapeDtypeStruct((batch, num_kv_heads, programs, q_rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_kv_heads, programs, q_rows), jnp.float32),
        ),
        grid=(batch, num_kv_heads, programs),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="kivi_decode_attention",
    )(lengths, q, *(state[p] for p in parts))
    out = combine_splits(out[:, :, :, :group], lse[:, :, :, :group])  # [B, K, Gq, H]
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)
