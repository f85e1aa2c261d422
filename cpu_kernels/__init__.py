"""C++ kernels for XLA:CPU, called through `jax.ffi`: the quantized matmul (qmatmul.cc),
the float-weight matmuls (bf16_matmul.cc: bfloat16 and float32 weights, decode-step
`linear` / `lm_head`) and single-token attention that writes the KV cache in place (attention.cc).

XLA:CPU has no fused dequantize-matmul: int4 weights are widened to float32 inside the
step and int8 ones run as an int8 x int8 dot. `qmatmul_cpu` instead multiplies the
packed bytes directly, as llama.cpp's Q4_1 x Q8_1 / Q8_0 x Q8_0 dot products do:
activations are quantized to int8 per block of 32 inside the kernel (about 0.5% of
the output's scale in error), and each block is an AVX2 (VNNI where present) integer
dot product. All kernels split their work over the library's own spinning worker
threads (parallel.h; `PALLAX_CPU_THREADS` caps them). They are compiled on first use
(build.py); `PALLAX_CPU_KERNELS=0` disables them.

`register()` (run on import) makes the kernel the CPU lowering of the `qlinear` op for
every row count (batch-invariant, the default: `primitives.base.BATCH_INVARIANT`; at 512
rows it is within 10% of XLA's dequantize-and-GEMM on the development machine, faster
below 128), or, batch-variant, for decode-sized inputs up to `MAX_ROWS` rows; layouts the
kernel does not cover keep the XLA lowering (`primitives.qmatmul_xla`). The two differ by
the kernel's activation quantization: per 32-block here, per row (per-channel int8) or
none (groups) in XLA. Float `linear` / `lm_head` run decode steps in the float kernels
(batch-variant: bfloat16 weights up to `BF16_MAX_ROWS` rows) and prefill in XLA's GEMM.
`attention` lowers to the attention kernel for T = 1 over float32 or bfloat16 caches
(`use_attention_kernel`), and over KIVI caches of every slot policy to the packed-cache
kernel (kivi_attention.cc, `use_kivi_kernel`).

`jax.export` refuses the kernels' custom calls (they have no compatibility guarantee):
export a CPU module with `PALLAX_CPU_KERNELS=0` set while lowering, or pass
`DisabledSafetyCheck.custom_call(...)` for each target name and import pallax in the
process that runs it, which registers the targets.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import mlir

from pallax.cpu_kernels import build, kivi
from pallax.ir import kvcache
from pallax.ir import primitives as ops
from pallax.ir.kvcache import DENSE, FULL, Dense, Int8, Kivi

ENV_SWITCH = "PALLAX_CPU_KERNELS"
TARGET = "pallax_qmatmul"
TARGET_OFFSET = "pallax_qmatmul_offset"


def available() -> bool:
    """Whether the FFI kernel can run here: not disabled by `PALLAX_CPU_KERNELS=0` and
    compiled and registered (built on the first call)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return build.ensure_registered()


def supported(bits: int, group_size: int, groups: int) -> bool:
    """Whether the kernel handles this weight layout (any other falls back to XLA):
    int4 with g 16, 32 or a multiple of 64; int8 per channel or g a multiple of 16."""
    if bits == 4:
        return group_size in (16, 32) or group_size % 64 == 0
    return bits == 8 and (groups == 1 or group_size % 16 == 0)


def _check(x, data, scale, offset, bits, group_size):
    if bits not in (4, 8):
        raise ValueError(f"qmatmul_cpu: {bits=} must be 4 or 8")
    if x.ndim != 2 or data.ndim != 2 or scale.ndim != 2:
        raise ValueError(
            f"qmatmul_cpu: x {x.shape}, data {data.shape}, scale {scale.shape}: not 2-D"
        )
    num_out, groups = scale.shape
    padded_in = groups * group_size
    want = (num_out, padded_in // 2 if bits == 4 else padded_in)
    dtype = jnp.uint8 if bits == 4 else jnp.int8
    if group_size <= 0 or (bits == 4 and group_size % 2):
        raise ValueError(f"qmatmul_cpu: {group_size=} must be positive (even for int4)")
    if x.shape[1] != padded_in:
        raise ValueError(
            f"qmatmul_cpu: x {x.shape} must be zero-padded to {padded_in=} ({groups=} x g)"
        )
    if tuple(data.shape) != want or data.dtype != dtype:
        raise ValueError(
            f"qmatmul_cpu: data {data.dtype}{tuple(data.shape)}, expected {jnp.dtype(dtype)}{want}"
        )
    if offset is not None and tuple(offset.shape) != tuple(scale.shape):
        raise ValueError(f"qmatmul_cpu: offset {offset.shape} must match scale {scale.shape}")


def qmatmul_cpu(x, data, scale, offset, *, bits: int, group_size: int) -> jax.Array:
    """x [R, Ip] @ dequant(w).T -> float32 [R, O], for a packed weight (ir/qformat.py).

    x must already be zero-padded to Ip = G * group_size. Runs the FFI kernel when
    `available()` and the layout is `supported`, else the same product in XLA
    (dequantize to float32, then dot). Traceable; R may be anything from 1 up.
    """
    _check(x, data, scale, offset, bits, group_size)
    x = x.astype(jnp.float32)
    scale = scale.astype(jnp.float32)
    offset = None if offset is None else offset.astype(jnp.float32)
    if not (available() and supported(bits, group_size, scale.shape[1])):
        return _qmatmul_xla(x, data, scale, offset, bits=bits, group_size=group_size)
    return _qmatmul_ffi(x, data, scale, offset, bits=bits, group_size=group_size)


def _qmatmul_ffi(x, data, scale, offset, *, bits, group_size, suffix=""):
    """The FFI call (`suffix` picks another registered build of the kernel, for tests)."""
    out = jax.ShapeDtypeStruct((x.shape[0], data.shape[0]), jnp.float32)
    target = TARGET if offset is None else TARGET_OFFSET
    operands = (x, data, scale) if offset is None else (x, data, scale, offset)
    call = jax.ffi.ffi_call(target + suffix, out)
    return call(*operands, bits=np.int64(bits), group_size=np.int64(group_size))


def _qmatmul_xla(x, data, scale, offset, *, bits, group_size):
    """The fallback: the weight dequantized to float32 [O, Ip], then x @ w.T."""
    num_out = data.shape[0]
    if bits == 4:
        d = data.reshape(num_out, -1, group_size // 2)
        v = jnp.concatenate([d & 15, d >> 4], axis=-1)  # [O, G, g]
    else:
        v = data.reshape(num_out, -1, group_size)
    w = v.astype(jnp.float32) * scale[..., None]
    if offset is not None:
        w = w + offset[..., None]
    return jnp.einsum("ri,oi->ro", x, w.reshape(num_out, -1), preferred_element_type=jnp.float32)


# Rows (tokens in the batch) up to which qlinear uses the kernel, by weight kind; from
# scripts/bench_qmatmul_cpu.py on the 2-core development machine (see use_kernel).
MAX_ROWS = {"int4": 64, "int8_groups": 64, "int8_channel": 64}


def use_kernel(rows: int, bits: int, group_size: int, groups: int) -> bool:
    """Whether qlinear's CPU lowering multiplies `rows` rows in the kernel (any row count
    when batch-invariant: its rows do not depend on each other)."""
    kind = "int4" if bits == 4 else ("int8_channel" if groups == 1 else "int8_groups")
    fits = ops.base.BATCH_INVARIANT or rows <= MAX_ROWS[kind]
    return fits and supported(bits, group_size, groups) and available()


def _qlinear_cpu_rule(x, data, scale, *rest, **params):
    rows = math.prod(x.shape[:-1])

    def matmul(x2, data, scale, off, *, bits, group_size, absmax=None, total_rows=None,
               per_token=True):  # fmt: skip
        whole = rows if total_rows is None else total_rows  # a data shard decides as the op
        if use_kernel(whole, bits, group_size, scale.shape[1]):  # activations per 32-block
            return _qmatmul_ffi(x2, data, scale, off, bits=bits, group_size=group_size)
        return ops.qmatmul_xla(x2, data, scale, off, bits=bits, group_size=group_size,
                               absmax=absmax, total_rows=total_rows,
                               per_token=per_token)  # fmt: skip

    # The outlier features (LLM.int8()) in the float32 kernel: its outputs do not depend on
    # the rows or the other outputs of the call (a tensor-parallel split keeps their bits).
    dense = _float_ffi if ops.base.BATCH_INVARIANT and available() else None
    return ops.qlinear_frame(matmul, x, data, scale, *rest, dense=dense, **params)


# ------------------------------------------------------------------ bfloat16 weights
TARGET_BF16 = "pallax_bf16_matmul"


def bf16_matmul(x, w) -> jax.Array:
    """x [R, I] (any float) @ w.T for a bfloat16 weight w [O, I] -> float32 [R, O].

    The FFI kernel when `available()` (it reads the bf16 bytes and widens them in
    registers), else XLA's widened float32 dot (`primitives.linear_reference` math).
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or w.dtype != jnp.bfloat16:
        raise ValueError(
            f"bf16_matmul: x {x.shape} and w {w.dtype}{w.shape}: need [R, I], bf16 [O, I]"
        )
    if not available():
        return ops._dot_rows(x.astype(jnp.float32), ops.widen(w), x.shape[0])
    return _float_ffi(x, w)


TARGET_F32 = "pallax_f32_matmul"


def f32_matmul(x, w) -> jax.Array:
    """x [R, I] @ w.T for a float32 weight w [O, I] -> float32 [R, O], each row reduced in
    one order whatever the rows beside it: the FFI kernel when `available()`, else XLA's
    GEMM (rows padded to two)."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or w.dtype != jnp.float32:
        raise ValueError(
            f"f32_matmul: x {x.shape} and w {w.dtype}{w.shape}: need [R, I], float32 [O, I]"
        )
    if not available():
        return ops._dot_rows(x.astype(jnp.float32), w, x.shape[0])
    return _float_ffi(x, w)


def _float_ffi(x, w, suffix=""):
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    target = TARGET_BF16 if w.dtype == jnp.bfloat16 else TARGET_F32
    return jax.ffi.ffi_call(target + suffix, out)(x.astype(jnp.float32), w)


# Batch-variant only: rows up to which bf16 linear / lm_head use the kernel. SmolLM2
# decode, 2 cores: batch 1 37.8 -> 62.8 tok/s with it (fp32 40.2); at batch 8 XLA's
# widened dot does better than the kernel (175 against 158 tok/s; fp32 ~195), where the
# 30 x 7 small matmuls are compute-bound and XLA's GEMM is the better-tuned one.
BF16_MAX_ROWS = 4


def use_float_kernel(x, w) -> bool:
    """Whether a linear / lm_head of x [..., D] against weight `w` runs in a float kernel.
    Batch-invariant: a decode step's rows (`per_token`, any batch) of bfloat16 or float32
    weights; prefill runs XLA's GEMM. Batch-variant: bfloat16 weights up to BF16_MAX_ROWS
    rows (XLA serves larger batches and prefill)."""
    rows = math.prod(x.shape[:-1])
    if ops.base.BATCH_INVARIANT:
        ok = w.dtype in (jnp.bfloat16, jnp.float32) and ops.base.per_token(x) and rows >= 1
    else:
        ok = w.dtype == jnp.bfloat16 and 1 <= rows <= BF16_MAX_ROWS
    return ok and available()


def _linear_cpu_rule(x, w):
    if not use_float_kernel(x, w):
        return ops.linear_reference(x, w)
    rows = math.prod(x.shape[:-1])
    y = _float_ffi(x.reshape(rows, x.shape[-1]), w)
    return y.reshape(*x.shape[:-1], w.shape[0]).astype(x.dtype)


def _lm_head_cpu_rule(x, table, *, softcap):
    if not use_float_kernel(x, table):
        return ops.lm_head_reference(x, table, softcap=softcap)
    rows = math.prod(x.shape[:-1])
    logits = _float_ffi(x.reshape(rows, x.shape[-1]), table).reshape(*x.shape[:-1], -1)
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)


# -------------------------------------------------------------- decode attention
TARGET_ATTENTION = "pallax_decode_attention"
TARGET_ATTENTION_INT8 = "pallax_decode_attention_int8"
TARGET_PREFILL = "pallax_prefill_attention"


def use_attention_kernel(q, k_cache) -> bool:
    """Whether `attention` runs in the kernel: single-token decode over a float32 or
    bfloat16 cache (prefill, T > 1, and other dtypes keep the XLA rule)."""
    return q.shape[1] == 1 and k_cache.dtype in (jnp.float32, jnp.bfloat16) and available()


def use_prefill_kernel(q, k_cache) -> bool:
    """Whether dense attention of a chunk (T > 1) runs in prefill_attention.cc: over a
    float32 or bfloat16 cache (the write stays in XLA)."""
    return q.shape[1] > 1 and k_cache.dtype in (jnp.float32, jnp.bfloat16) and available()


def _prefill_call(q, k_cache, v_cache, pos, *, scale, sliding_window, softcap, suffix=""):
    call = jax.ffi.ffi_call(TARGET_PREFILL + suffix, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(q.astype(jnp.float32), k_cache, v_cache, pos.astype(jnp.int32),
               scale=np.float32(scale), window=np.int64(sliding_window or 0),
               softcap=np.float32(softcap or 0.0))  # fmt: skip
    return out.astype(q.dtype)


def _prefill_ffi(q, k, v, k_cache, v_cache, pos, *, scale, sliding_window, softcap, suffix=""):
    """Write the chunk's k, v at pos (XLA), then attend in the flash kernel."""
    k_cache = ops.write_kv(k_cache, k, pos)
    v_cache = ops.write_kv(v_cache, v, pos)
    out = _prefill_call(q, k_cache, v_cache, pos, scale=scale, sliding_window=sliding_window,
                        softcap=softcap, suffix=suffix)  # fmt: skip
    return out, k_cache, v_cache


def use_candidate_prefill(q, format, policy) -> bool:
    """Whether a chunk (T > 1) over a compressed cache with the full policy (int8, KIVI)
    attends in the flash prefill kernel: its candidates laid out by position."""
    return q.shape[1] > 1 and policy == FULL and not isinstance(format, Dense) and available()


def _candidate_prefill(q, k, v, pos, valid, state, format, *, scale, sliding_window, softcap,
                       suffix=""):  # fmt: skip
    """The reference's candidates (decoded rows, staging, first rows, the chunk's own keys
    as the format admits them: float32) placed at their positions in a dense
    [B, K, S, H] view, S the rows' slot count (the full policy addresses every position
    below it, and each position has one candidate), attended by the flash prefill kernel;
    then the reference's write. A slot no real query sees (a padding token's) is zeros."""
    keys, vals, kpos, _, _, sections = kvcache.core.candidates(k, v, state, pos, valid, format,
                                                               FULL)  # fmt: skip
    b, kv, _, h = keys.shape
    s = sections[2]
    kpos = jnp.broadcast_to(kpos, keys.shape[:3])
    at = jnp.where((kpos >= 0) & (kpos < s), kpos, s)  # s: dropped
    rows, heads = jnp.arange(b)[:, None, None], jnp.arange(kv)[None, :, None]
    place = lambda x: jnp.zeros((b, kv, s, h), x.dtype).at[rows, heads, at].set(  # noqa: E731
        x, mode="drop")  # fmt: skip
    out = _prefill_call(q, place(keys), place(vals), pos, scale=scale,
                        sliding_window=sliding_window, softcap=softcap, suffix=suffix)  # fmt: skip
    return out, kvcache.core.write(state, k, v, pos, valid, format, FULL, None, sections)


def use_int8_kv_kernel(q, format, policy) -> bool:
    """Whether `attention` over an int8 x full cache runs in attention.cc's int8 entry:
    single-token decode (prefill and chunks, T > 1, and the eviction policies keep the
    reference)."""
    return isinstance(format, Int8) and policy == FULL and q.shape[1] == 1 and available()


def use_kivi_kernel(q, format) -> bool:
    """Whether `attention` over a KIVI cache runs in kivi_attention.cc: single-token
    decode (prefill and chunks, T > 1, keep the reference)."""
    return isinstance(format, Kivi) and q.shape[1] == 1 and available()


def decode_attention_cpu(q, k, v, k_cache, v_cache, pos, *, scale, sliding_window, softcap):
    """Write k, v [B, 1, K, H] at pos [B] into the caches [B, K, S, H], attend q [B, 1, N, H]
    over them: `primitives.attention`'s contract for T = 1, in the kernel (the caches are
    aliased to the results and written in place) when `use_attention_kernel`, else the
    reference. -> (out [B, 1, N, H] in q's dtype, k_cache, v_cache)."""
    if q.ndim != 4 or q.shape[1] != 1:
        raise ValueError(f"decode_attention_cpu: q {q.shape} must be [B, 1, N, H]")
    valid = jnp.ones(pos.shape, jnp.int32)
    return _attention_cpu_rule(
        q, k, v, pos, valid, k_cache, v_cache, format=DENSE, policy=FULL, rope=None, scale=scale,
        sliding_window=sliding_window, softcap=softcap,
    )  # fmt: skip


def _attention_ffi(q, k, v, k_cache, v_cache, pos, *, scale, sliding_window, softcap, suffix=""):
    b, _, n, h = q.shape
    out_types = (
        jax.ShapeDtypeStruct((b, n, h), jnp.float32),
        jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
        jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
    )
    call = jax.ffi.ffi_call(TARGET_ATTENTION + suffix, out_types, input_output_aliases={3: 1, 4: 2})
    f32 = jnp.float32
    out, k_cache, v_cache = call(
        q[:, 0].astype(f32),
        k[:, 0].astype(f32),
        v[:, 0].astype(f32),
        k_cache,
        v_cache,
        pos.astype(jnp.int32),
        scale=np.float32(scale),
        window=np.int64(sliding_window or 0),
        softcap=np.float32(softcap or 0.0),
    )
    return out[:, None].astype(q.dtype), k_cache, v_cache


def _attention_int8_ffi(q, k, v, pos, valid, state, format, policy, rope, *, scale,
                        sliding_window, softcap, suffix=""):  # fmt: skip
    """The int8 x full cache's decode step (`kivi.kivi_decode`'s signature; the policy is
    full, and there is no rope in the cache): the token quantized by the format's
    `encode` (in XLA, the same rounding as prefill's writes), written and attended in
    the kernel."""
    del policy, rope
    b, _, n, h = q.shape
    new = format.encode(k[:, 0], v[:, 0])  # [B, K, H] int8, [B, K] scales
    names = ("k.data", "k.scale", "v.data", "v.scale")
    out_types = (jax.ShapeDtypeStruct((b, n, h), jnp.float32),) + tuple(
        jax.ShapeDtypeStruct(state[name].shape, state[name].dtype) for name in names
    )
    call = jax.ffi.ffi_call(TARGET_ATTENTION_INT8 + suffix, out_types,
                            input_output_aliases={i: i - 4 for i in range(5, 9)})  # fmt: skip
    out, *rows = call(
        q[:, 0].astype(jnp.float32), new["k.data"], new["k.scale"], new["v.data"],
        new["v.scale"], *(state[name] for name in names), pos.astype(jnp.int32),
        valid.astype(jnp.int32), scale=np.float32(scale), window=np.int64(sliding_window or 0),
        softcap=np.float32(softcap or 0.0),
    )  # fmt: skip
    return out[:, None].astype(q.dtype), dict(zip(names, rows, strict=True))


def _attention_cpu_rule(q, k, v, pos, valid, *cache, format, policy, rope, scale,
                        sliding_window, softcap):  # fmt: skip
    """Decode (T = 1): dense x full and int8 x full in the C++ kernel that writes in place,
    KIVI x any policy in the packed-cache kernel (kivi.py); prefill and chunks (T > 1)
    with the full policy in the flash prefill kernel (a compressed cache's candidates
    laid out by position); everything else (H2O, sinks prefill): the reference."""
    dense_full = isinstance(format, Dense) and policy == FULL
    if dense_full and use_prefill_kernel(q, cache[0]):
        return _prefill_ffi(q, k, v, *cache, pos, scale=scale, sliding_window=sliding_window,
                            softcap=softcap)  # fmt: skip
    if use_candidate_prefill(q, format, policy):
        names = kvcache.part_names(format, policy)
        out, new = _candidate_prefill(q, k, v, pos, valid, dict(zip(names, cache, strict=True)),
                                      format, scale=scale, sliding_window=sliding_window,
                                      softcap=softcap)  # fmt: skip
        return (out, *(new[n] for n in names))
    if use_int8_kv_kernel(q, format, policy):
        rows_kernel = _attention_int8_ffi
    elif use_kivi_kernel(q, format):
        rows_kernel = kivi.kivi_decode
    else:
        rows_kernel = None
    if rows_kernel is not None:  # the cache arrays by name, in the op's order
        names = kvcache.part_names(format, policy)
        out, new = rows_kernel(
            q, k, v, pos, valid, dict(zip(names, cache, strict=True)), format, policy, rope,
            scale=scale, sliding_window=sliding_window, softcap=softcap,
        )  # fmt: skip
        return (out, *(new[n] for n in names))
    if not (dense_full and use_attention_kernel(q, cache[0])):
        return ops.attention_reference(
            q, k, v, pos, valid, *cache, format=format, policy=policy, rope=rope, scale=scale,
            sliding_window=sliding_window, softcap=softcap,
        )  # fmt: skip
    k_cache, v_cache = cache
    return _attention_ffi(
        q, k, v, k_cache, v_cache, pos, scale=scale, sliding_window=sliding_window,
        softcap=softcap,
    )  # fmt: skip


def register() -> None:
    """Install the kernels as the CPU lowerings of qlinear, of linear and lm_head with
    bfloat16 weights and of decode attention (each falls back to XLA where unused)."""
    for prim, rule in (
        (ops.qlinear_p, _qlinear_cpu_rule),
        (ops.linear_p, _linear_cpu_rule),
        (ops.lm_head_p, _lm_head_cpu_rule),
        (ops.attention_p, _attention_cpu_rule),
        (fused.linears_p, fused.linears_cpu_rule),
    ):
        mlir.register_lowering(
            prim, mlir.lower_fun(rule, multiple_results=prim.multiple_results), platform="cpu"
        )


from pallax.cpu_kernels import fused  # noqa: E402 (after the names it uses)
from pallax.cpu_kernels.fused import (  # noqa: E402
    TARGET_FLOAT_MULTI,
    TARGET_MULTI,
    float_matmul_multi,
    qmatmul_multi,
)  # fmt: skip

register()

__all__ = [
    "BF16_MAX_ROWS", "MAX_ROWS", "available", "bf16_matmul", "decode_attention_cpu",
    "TARGET_FLOAT_MULTI", "TARGET_MULTI", "f32_matmul", "float_matmul_multi", "qmatmul_cpu",
    "qmatmul_multi", "register", "supported",
    "use_attention_kernel",
    "use_float_kernel", "use_int8_kv_kernel", "use_kernel", "use_kivi_kernel",
    "use_candidate_prefill", "use_prefill_kernel",
]  # fmt: skip
