"""Per-platform lowerings of the semantic ops: Pallas kernels on `tpu` and `cuda`.

CPU keeps the reference rules registered with the primitives. jax picks the rule
for the platform it lowers for, so one exported module can carry all three.
Where a kernel does not cover a case (for example prefill attention under the H2O
or sinks policies, or float32 decode attention on CUDA, whose Mosaic GPU
kernel is 16-bit only) the rule falls back to the reference math for that platform.
The Triton kernels (`qmatmul`, flash prefill attention, the KIVI and slot attention
kernels on CUDA) need `export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")`
at export.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.interpreters import mlir

from pallax.ir import kvcache
from pallax.ir import primitives as ops
from pallax.ir.kvcache import FULL, Dense, Kivi, core
from pallax.pallas_kernels.decode_attention import decode_attention
from pallax.pallas_kernels.flash_attention import flash_attention
from pallax.pallas_kernels.flash_attention import supports as flash_supports
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


def _dense_full_rule(q, k, v, k_cache, v_cache, pos, *, scale, sliding_window, softcap, platform):
    """Write the new k/v, then attend: the FlashDecoding kernel for single-token decode,
    the FlashAttention kernel for prefill and its chunks (T > 1)."""
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
    elif q.shape[1] > 1 and flash_supports(q.shape, k_cache.shape, k_cache.dtype, platform):
        out = flash_attention(
            q.astype(k_cache.dtype), k_cache, v_cache, pos.astype(jnp.int32), scale=scale,
            sliding_window=sliding_window, softcap=softcap, platform=platform,
        ).astype(q.dtype)  # fmt: skip
    else:
        out = ops.attention_core(
            q, k_cache, v_cache, pos, scale=scale, sliding_window=sliding_window, softcap=softcap
        )
    return out, k_cache, v_cache


def _attention_rule(q, k, v, pos, valid, *cache, format, policy, rope, scale, sliding_window,
                    softcap, platform):  # fmt: skip
    """The attention op per storage format: dense x full decodes with the FlashDecoding
    kernel, KIVI x full with the KIVI kernel, every other combination with the slot
    kernel over its candidates (the policy given as slot positions). Prefill and chunks
    (T > 1) run the FlashAttention kernel: over the dense cache's slots, or over a
    compressed cache's candidates at their positions; under H2O or sinks, the reference."""
    kw = dict(scale=scale, sliding_window=sliding_window, softcap=softcap)
    if isinstance(format, Dense) and policy == FULL:
        return _dense_full_rule(q, k, v, *cache, pos, platform=platform, **kw)
    names = kvcache.part_names(format, policy)
    state = dict(zip(names, cache, strict=True))
    if q.shape[1] != 1:
        if policy != FULL:  # H2O's mass and the sinks' rotated queries: the reference
            return ops.attention_reference(q, k, v, pos, valid, *cache, format=format,
                                           policy=policy, rope=rope, **kw)  # fmt: skip
        out, state = _candidate_prefill(q, k, v, pos, valid, state, format, platform=platform,
                                        **kw)  # fmt: skip
        return (out.astype(q.dtype), *(state[n] for n in names))
    if isinstance(format, Kivi) and policy == FULL:
        out, state = _kivi_decode(q, k, v, pos, valid, state, format, platform=platform, **kw)
    else:
        out, state = _slot_decode(q, k, v, pos, valid, state, format, policy, rope,
                                  platform=platform, **kw)  # fmt: skip
    return (out.astype(q.dtype), *(state[n] for n in names))


def _candidate_prefill(q, k, v, pos, valid, state, fmt, *, platform, **kw):
    """Prefill or a chunk (T > 1) over a compressed cache with every position kept: the
    reference's candidates (decoded rows, staging, the chunk's own keys as the format
    admits them) at their positions, attended by the flash kernel, then the reference's
    write. The candidates are float32, as the reference attends them."""
    keys, vals, kpos, _, _, sections = core.candidates(k, v, state, pos, valid, fmt, FULL)
    if not flash_supports(q.shape, keys.shape, keys.dtype, platform):
        out, state = core.reference(q, k, v, pos, valid, state, fmt, FULL, rope=None, **kw)
        return out, state
    out = flash_attention(q.astype(keys.dtype), keys, vals, pos.astype(jnp.int32),
                          kpos=kpos.astype(jnp.int32), platform=platform, **kw)  # fmt: skip
    return out, core.write(state, k, v, pos, valid, fmt, FULL, None, sections)


def _kivi_decode(q, k, v, pos, valid, state, fmt, *, platform, **kw):
    """Stage the token in the ring, attend with the KIVI kernel (the token's group not yet
    quantized: `pending=1`), then quantize a group that left the ring (XLA). A padding
    row (valid 0) attends the positions before pos, as the reference does: the ring
    still holds every position from num_quantized(pos - 1) on."""
    zeros = jnp.zeros((k.shape[0], k.shape[2], 1), jnp.float32)
    state = core.stage(state, k, v, pos, valid, fmt, kvcache.FULL, zeros)
    out = kivi_decode_attention(
        q[:, 0], state, (pos + valid).astype(jnp.int32), bits=fmt.bits, group_size=fmt.group_size,
        residual=fmt.residual, full_first=fmt.full_first, pending=1, platform=platform, **kw,
    )[:, None]  # fmt: skip
    return out, core.leave(state, k, v, pos, valid, fmt, kvcache.FULL, zeros)


def _slot_decode(q, k, v, pos, valid, state, fmt, policy, rope, *, platform, **kw):
    """Any format x policy: the candidates (decoded rows, staging, the new token) at their
    slot positions, the slot kernel (which also returns each key's attention mass), then
    the reference's write. Sinks' rotation is applied to the sink keys instead of the
    query (`core.rotate_sink_keys`)."""
    keys, vals, kpos, tpos, real, sections = core.candidates(k, v, state, pos, valid, fmt, policy)
    qp = tpos[:, 0]
    kpos = jnp.where(policy.visible(kpos, qp[:, None, None]), kpos, -1)
    keys = core.rotate_sink_keys(keys, kpos, qp, sections[0] + sections[1], policy, rope)
    kpos = jnp.broadcast_to(kpos, keys.shape[:3]).astype(jnp.int32)
    out, mass = h2o_decode_attention(
        q[:, 0], keys, vals, kpos, qp.astype(jnp.int32), platform=platform, **kw
    )
    mass = jnp.where(real[:, :, None], mass, 0.0) if policy.needs_mass else None
    return out[:, None], core.write(state, k, v, pos, valid, fmt, policy, mass, sections)


def _qlinear_rule(x, data, scale, *rest, platform, **params):
    """The dequantizing matmul kernel inside `qlinear_frame` (outliers multiply outside it).

    Per-channel int8 keeps the op's W8A8 meaning: activations are quantized per row
    first, and the kernel multiplies their (exact, float32) dequantized values.
    """

    def matmul(
        x2, data, scale, off, *, bits, group_size, absmax=None, total_rows=None, per_token=True
    ):
        del total_rows, per_token  # the kernel's method does not depend on the rows
        if bits == 8 and off is None and scale.shape[1] == 1:
            xq, xs = ops.quantize_rows(x2, absmax)
            x2 = xq.astype(jnp.float32) * xs
        return qmatmul(x2, data, scale, off, bits=bits, group_size=group_size, platform=platform)

    return ops.qlinear_frame(matmul, x, data, scale, *rest, **params)


def register() -> None:
    rules = (  # (primitive, rule, multiple results)
        (ops.rms_norm_p, _rms_norm_rule, False),
        (ops.qlinear_p, _qlinear_rule, False),
        (ops.attention_p, _attention_rule, True),
    )
    for platform in PLATFORMS:
        for prim, rule, multiple in rules:
            fn = mlir.lower_fun(functools.partial(rule, platform=platform), multiple)
            mlir.register_lowering(prim, fn, platform=platform)


register()
