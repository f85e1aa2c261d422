"""Input checks of the KIVI decode attention wrapper: one clear error per bad argument,
before anything is traced into a kernel."""

from __future__ import annotations

import math

import jax.numpy as jnp

from pallax.pallas_kernels.kivi_attention.bounds import FIRST_PARTS, PARTS

SUPPORTED_BITS = (2, 4, 8)
_TPU_LANES = 128


def check_inputs(q, state, lengths, bits, group_size, residual, full_first, window, softcap):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{bits=} must be one of {SUPPORTED_BITS}")
    if group_size < 1 or residual < 0 or full_first < 0 or full_first % group_size:
        raise ValueError(
            f"{group_size=} must be positive, {residual=} non-negative and {full_first=} a"
            " non-negative multiple of group_size"
        )
    parts = PARTS + (FIRST_PARTS if full_first else ())
    if sorted(state) != sorted(parts):
        raise ValueError(f"state has {sorted(state)}, expected {sorted(parts)} ({full_first=})")
    if q.ndim != 3:
        raise ValueError(f"q.shape={q.shape} must be [B, N, H]")
    batch, num_heads, head_dim = q.shape
    if head_dim % group_size or head_dim * bits % 8:
        raise ValueError(f"{head_dim=} must be a multiple of {group_size=} and of 8 / {bits=}")
    kd = state["k.data"]
    if kd.ndim != 4 or kd.shape[0] != batch:
        raise ValueError(f"k.data.shape={kd.shape} must be [B={batch}, K, S, H*bits/8]")
    _, num_kv_heads, seq_len, _ = kd.shape
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} must be divisible by {num_kv_heads=}")
    lead = (batch, num_kv_heads)
    want = {
        "k.data": (seq_len, head_dim * bits // 8), "v.data": (seq_len, head_dim * bits // 8),
        "k.scale": (-(-seq_len // group_size), head_dim),
        "k.zero": (-(-seq_len // group_size), head_dim),
        "v.scale": (seq_len, head_dim // group_size), "v.zero": (seq_len, head_dim // group_size),
        "k.res": (residual + group_size, head_dim), "v.res": (residual + group_size, head_dim),
        "k.first": (full_first, head_dim), "v.first": (full_first, head_dim),
    }  # fmt: skip
    for name in parts:
        if state[name].shape != lead + want[name]:
            raise ValueError(
                f"{name}.shape={state[name].shape} must be {lead + want[name]} for"
                f" q.shape={q.shape}, {bits=}, {group_size=}, {residual=}, {full_first=}"
            )
    if kd.dtype != jnp.uint8 or state["v.data"].dtype != jnp.uint8:
        raise ValueError(f"k.data ({kd.dtype}) and v.data ({state['v.data'].dtype}) must be uint8")
    metadata = {state[p].dtype for p in ("k.scale", "k.zero", "v.scale", "v.zero")}
    full = {state[p].dtype for p in parts if p.endswith((".res", ".first"))}
    if len(metadata) != 1 or len(full) != 1:
        raise ValueError(
            f"scales and zero points ({metadata}) must share one dtype, and so must the"
            f" full-precision rows ({full})"
        )
    if lengths.shape != (batch,) or lengths.dtype != jnp.int32:
        raise ValueError(f"lengths ({lengths.shape}, {lengths.dtype}) must be int32 [{batch}]")
    if window is not None and window < 1:
        raise ValueError(f"sliding_window={window} must be positive or None")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"{softcap=} must be positive or None")


def check_tpu_block(block_s, seq_len, group_size, scale_dtype):
    if block_s >= seq_len:
        return
    sublanes = 8 * (4 // jnp.dtype(scale_dtype).itemsize)
    unit = math.lcm(_TPU_LANES, sublanes * group_size)
    if block_s % unit:
        raise ValueError(
            f"{block_s=} must be a multiple of {unit} on TPU ({group_size=}, scales"
            f" {jnp.dtype(scale_dtype).name}) when it is below {seq_len=}"
        )
