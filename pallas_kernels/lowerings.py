"""Per-platform lowerings of the semantic ops: Pallas kernels on `tpu` and `cuda`.

CPU keeps the reference rules registered with the primitives. jax picks the rule
for the platform it lowers for, so one exported module can carry all three.
Where a kernel does not cover a case (for example prefill attention, T > 1, or
float32 decode attention on CUDA, whose Mosaic GPU kernel is 16-bit only) the
rule falls back to the reference math for that platform. The Triton kernels
(`qmatmul`, `kivi_attention` and `h2o_attention` on CUDA) need
`export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")` at export.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.interpreters import mlir

from pallax.ir import kvh2o, kvquant
from pallax.ir import primitives as ops
from pallax.pallas_kernels.decode_attention import decode_attention
from pallax.pallas_kernels.h2o_attention import h2o_decode_attention
from pallax.pallas_kernels.kivi_attention import kivi_decode_attention
from pallax.pallas_kernels.platforms import PLATFORMS
from pallax.pallas_kernels.qmatmul import qmatmul
from pallax.pallas_kernels.rms_norm import rms_norm


def _rms_norm_rule(x, w, *, eps, platform):
    return rms_norm(x, w, eps=eps, platform=platform)


def _uses_decode_kernel(q, k_cache, platform) -> bool:
    if q.shape[1] != 1:
        return False
    if platform == "cuda":
        h = q.shape[-1]
        return k_cache.dtype in (jnp.bfloat16, jnp.float16) and h % 64 == 0 and h <= 256
    return True


def _attention_rule(q, k, v, k_cache, v_cache, pos, *, scale, sliding_window, softcap, platform):
    """Write the new k/v, then attend: the FlashDecoding kernel for single-token decode."""
    k_cache = ops.write_kv(k_cache, k, pos)
    v_cache = ops.write_kv(v_cache, v, pos)
    if _uses_decode_kernel(q, k_cache, platform):
        out = decode_attention(
            q[:, 0].astype(k_cache.dtype),  # [B, N, H]
            k_cache,
            v_cache,
            pos + 1,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            platform=platform,
        )
        out = out[:, None].astype(q.dtype)  # [B, 1, N, H]
    else:
        out = ops.attention_core(
            q, k_cache, v_cache, pos, scale=scale, sliding_window=sliding_window, softcap=softcap
        )
    return out, k_cache, v_cache


def _qlinear_rule(x, data, scale, *rest, platform, **params):
    """The dequantizing matmul kernel inside `qlinear_frame` (outliers multiply outside it).

    Per-channel int8 keeps the op's W8A8 meaning: activations are quantized per row
    first, and the kernel multiplies their (exact, float32) dequantized values.
    """

    def matmul(x2, data, scale, off, *, bits, group_size):
        if bits == 8 and off is None and scale.shape[1] == 1:
            xq, xs = ops.quantize_rows(x2)
            x2 = xq.astype(jnp.float32) * xs
        return qmatmul(x2, data, scale, off, bits=bits, group_size=group_size, platform=platform)

    return ops.qlinear_frame(matmul, x, data, scale, *rest, **params)


def _kivi_attention_rule(
    q, k, v, pos, valid, *state, scale, sliding_window, softcap, bits, group_size, residual,
    scale_dtype, full_first=0, platform,
):  # fmt: skip
    """Write k/v into the KIVI cache (XLA), then attend: the kernel for single-token decode.

    The kernel reads the query at ``pos + valid - 1``: for a padding row (valid 0) that
    is ``pos - 1``, so with a sliding window its output (unused) may differ.
    """
    cfg = kvquant.KiviConfig(bits, group_size, residual, scale_dtype, full_first)
    st = kvquant.write(dict(zip(cfg.parts, state, strict=True)), k, v, pos, valid, cfg)
    if q.shape[1] == 1:
        out = kivi_decode_attention(
            q[:, 0],  # [B, N, H]
            st,
            (pos + valid).astype(jnp.int32),
            bits=bits,
            group_size=group_size,
            residual=residual,
            full_first=full_first,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            platform=platform,
        )[:, None]  # [B, 1, N, H]
    else:
        out = kvquant.attend(
            q, st, pos, valid, cfg, scale=scale, sliding_window=sliding_window, softcap=softcap
        )
    return (out.astype(q.dtype), *(st[p] for p in cfg.parts))


def _h2o_attention_rule(
    q, k, v, pos, valid, k_cache, v_cache, slot_pos, slot_score, *, budget, recent, scale,
    sliding_window, softcap, platform,
):  # fmt: skip
    """H2O for single-token decode: the kernel attends over the candidates and returns the
    mass each received, then the scores and the eviction are the reference's (XLA).

    A padding row (valid 0) attends like the reference (its new token is not a candidate)
    and adds no mass, as the reference's query weights do. Prefill and chunks (T > 1)
    use the reference.
    """
    cfg = kvh2o.H2OConfig(budget, recent)
    if q.shape[1] != 1:
        return kvh2o.h2o_attention_reference(
            q, k, v, pos, valid, k_cache, v_cache, slot_pos, slot_score, budget=budget,
            recent=recent, scale=scale, sliding_window=sliding_window, softcap=softcap,
        )  # fmt: skip
    state = {"k": k_cache, "v": v_cache, "pos": slot_pos, "score": slot_score}
    keys, vals, kpos, tpos, real = kvh2o.candidates(k, v, state, pos, valid)
    out, mass = h2o_decode_attention(
        q[:, 0],  # [B, N, H]
        keys,
        vals,
        kpos.astype(jnp.int32),
        tpos[:, 0].astype(jnp.int32),
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
        platform=platform,
    )
    mass = jnp.where(real[:, :, None], mass, 0.0)  # [B, K, M + 1]
    new = kvh2o.evict(state, keys, vals, kpos, mass, pos + valid, cfg)
    return (out[:, None].astype(q.dtype), *(new[p] for p in kvh2o.PARTS))


def register() -> None:
    rules = (  # (primitive, rule, multiple results)
        (ops.rms_norm_p, _rms_norm_rule, False),
        (ops.qlinear_p, _qlinear_rule, False),
        (ops.attention_p, _attention_rule, True),
        (kvquant.kivi_attention_p, _kivi_attention_rule, True),
        (kvh2o.h2o_attention_p, _h2o_attention_rule, True),
    )
    for platform in PLATFORMS:
        for prim, rule, multiple in rules:
            fn = mlir.lower_fun(functools.partial(rule, platform=platform), multiple)
            mlir.register_lowering(prim, fn, platform=platform)


register()
