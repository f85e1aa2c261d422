"""Decode attention over a paged KV cache in attention.cc (runtime/kv_pages.py's pools).

`paged_decode_cpu(q, k, v, pos, valid, pools, table, format, ...)`: the op's decode
(T = 1, the full policy) for a dense (float32, bfloat16) or int8 cache whose arrays are
pools of pages [P, K, page, ...] addressed through a block table [B, n]: the token is
written into its page and the query attends its row's pages where they lie, in place
(the pools are aliased to the results), with the arithmetic of the slot-cache entries.
A row attends only positions in the pages it holds; a token whose page it does not
hold is not written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallax.ir.kvcache import FULL, Dense, Int8

TARGET_PAGED = "pallax_paged_decode_attention"
TARGET_PAGED_INT8 = "pallax_paged_decode_attention_int8"


def supports(q, format, policy, pools) -> bool:
    """Whether the kernel covers this decode: one token, the full policy, a dense float32
    or bfloat16 cache or an int8 one, and a compiler to build it."""
    from pallax.cpu_kernels import available

    if q.shape[1] != 1 or policy != FULL or not available():
        return False
    if isinstance(format, Dense):
        return pools[0].dtype in (jnp.float32, jnp.bfloat16)
    return isinstance(format, Int8)


def paged_decode_cpu(q, k, v, pos, valid, pools, table, format, *, scale, sliding_window,
                     softcap):  # fmt: skip
    """-> (out [B, 1, N, H] in q's dtype, the pools in the op's order)."""
    b, _, n, h = q.shape
    f32 = jnp.float32
    attrs = dict(scale=np.float32(scale), window=np.int64(sliding_window or 0),
                 softcap=np.float32(softcap or 0.0))  # fmt: skip
    out_type = jax.ShapeDtypeStruct((b, n, h), f32)
    pool_types = tuple(jax.ShapeDtypeStruct(p.shape, p.dtype) for p in pools)
    table, pos = table.astype(jnp.int32), pos.astype(jnp.int32)
    if isinstance(format, Dense):
        call = jax.ffi.ffi_call(TARGET_PAGED, (out_type, *pool_types),
                                input_output_aliases={3: 1, 4: 2})  # fmt: skip
        out, *pools = call(q[:, 0].astype(f32), k[:, 0].astype(f32), v[:, 0].astype(f32),
                           *pools, table, pos, **attrs)  # fmt: skip
    else:  # int8: pools in the op's order k.data, k.scale, v.data, v.scale
        new = format.encode(k[:, 0], v[:, 0])  # [B, K, H] int8, [B, K] scales
        call = jax.ffi.ffi_call(TARGET_PAGED_INT8, (out_type, *pool_types),
                                input_output_aliases={i: i - 4 for i in range(5, 9)})  # fmt: skip
        token = (new["k.data"], new["k.scale"], new["v.data"], new["v.scale"])
        out, *pools = call(q[:, 0].astype(f32), *token, *pools, table, pos,
                           valid.astype(jnp.int32), **attrs)  # fmt: skip
    return out[:, None].astype(q.dtype), pools
