"""Single-token attention over a KIVI cache on CPU, in the C++ kernel
(kivi_attention.cc): the packed rows are read where they are, never decoded to a dense
copy, for every slot policy (full, H2O, sinks).

The XLA side here only gathers the small full-precision candidates (the first rows, the
new token, the staging ring), the positions every key holds with the visibility rules
applied (causality, the window, the policy's own), and after the kernel runs the
reference's write (`ir/kvcache/core.write`), so the cache it leaves is the reference's
bit for bit. The kernel returns each key's attention mass when the policy needs it
(H2O's scores).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallax.ir.kvcache import Kivi, core
from pallax.ir.kvcache.format import F32, ring_positions

TARGET_KIVI = "pallax_kivi_attention"


def _visible(p, qp, policy, sliding_window):
    """p [B, R, S] positions (-1: empty) -> p where a query at qp [B] sees it, else -1."""
    q = qp[:, None, None]
    ok = (p >= 0) & (p <= q) & policy.visible(p, q)
    if sliding_window is not None:
        ok &= p > q - sliding_window
    return jnp.where(ok, p, -1).astype(jnp.int32)


def kivi_decode(q, k, v, pos, valid, state: dict, fmt: Kivi, policy, rope, *, scale,
                sliding_window, softcap, suffix: str = "") -> tuple:  # fmt: skip
    """`attention` for T = 1 over a KIVI x `policy` cache: q [B, 1, N, H], k, v [B, 1, K, H]
    at pos [B] (valid [B]: 0 for a padding row). -> (out [B, 1, N, H] in q's dtype, the
    new state)."""
    b, t, kv, h = k.shape
    if t != 1:
        raise ValueError(f"kivi_decode: {t} tokens a row; the kernel decodes one")
    n_first = core.first_size(fmt, policy)
    dtype = core.full_precision_dtype(state, k.dtype)
    stored = fmt.stored(pos)  # [B]
    real = valid > 0
    # The full-precision candidates: [first rows, the new token, staging], as
    # core.candidates orders them around the rows.
    # They go to the kernel in the cache's bfloat16 where they are bfloat16 values (the new
    # token is admitted to that dtype), which halves the bytes gathered every step;
    # float32 when rotated sink keys are among them.
    cdt = jnp.bfloat16 if dtype == jnp.bfloat16 and not policy.sinks else F32
    ck, cv, cpos = [], [], []
    if n_first:
        j = jnp.arange(n_first, dtype=jnp.int32)[None, :]
        ck.append(state["k.first"].astype(cdt))
        cv.append(state["v.first"].astype(cdt))
        cpos.append(jnp.where(j < jnp.minimum(stored, n_first)[:, None], j, -1))
    ck.append(fmt.admit(jnp.swapaxes(k, 1, 2), dtype).astype(cdt))
    cv.append(fmt.admit(jnp.swapaxes(v, 1, 2), dtype).astype(cdt))
    cpos.append(jnp.where(real, pos, -1)[:, None])
    if fmt.staging:
        spos = ring_positions(pos, fmt.staging)
        ck.append(state["k.res"].astype(cdt))
        cv.append(state["v.res"].astype(cdt))
        cpos.append(jnp.where(spos >= stored[:, None], spos, -1))
    ck, cv = jnp.concatenate(ck, axis=2), jnp.concatenate(cv, axis=2)
    cpos = _visible(jnp.concatenate(cpos, axis=1)[:, None], pos, policy, sliding_window)
    ck = core.rotate_sink_keys(ck, cpos, pos, n_first + 1, policy, rope)
    rows = state["k.data"].shape[2]
    rpos = policy.row_positions(fmt, state, stored, kv, rows)  # [B, 1 or K, rows]
    rpos = jnp.where((rpos >= n_first) & (rpos < stored[:, None, None]), rpos, -1)
    rpos = _visible(rpos, pos, policy, sliding_window)

    n = q.shape[2]
    c = ck.shape[2]
    mass_shapes = ((b, kv, rows), (b, kv, c)) if policy.needs_mass else ((0,), (0,))
    out_types = (jax.ShapeDtypeStruct((b, n, h), F32),
                 *(jax.ShapeDtypeStruct(s, F32) for s in mass_shapes))  # fmt: skip
    # The packed rows go through the call as aliased results (the kernel leaves them as
    # they are), and the write below updates the call's results: the write is ordered
    # after the kernel's reads by data, so XLA updates the cache in place instead of
    # copying it around the kernel (14 cache-sized copies a step before).
    names = ("k.data", "k.scale", "k.zero", "v.data", "v.scale", "v.zero")
    convert = state["k.scale"].dtype not in (jnp.bfloat16, jnp.float32)  # f16: read as f32
    rows_in = [state[x].astype(F32) if convert and "data" not in x else state[x] for x in names]
    out_types = (*out_types, *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in rows_in))
    out, mass_rows, mass_cand, *rows_out = jax.ffi.ffi_call(
        TARGET_KIVI + suffix, out_types, input_output_aliases={i: i + 2 for i in range(1, 7)}
    )(q[:, 0].astype(F32), *rows_in, rpos, ck, cv, cpos, bits=np.int64(fmt.bits),
      group_size=np.int64(fmt.group_size), scale=np.float32(scale),
      softcap=np.float32(softcap or 0.0))  # fmt: skip
    state = dict(state)
    state.update((x, r) for x, r in zip(names, rows_out, strict=True)
                 if not convert or "data" in x)  # fmt: skip
    mass = None
    sections = [n_first, 1, rows, fmt.staging]
    if policy.needs_mass:  # back to the candidates' order: [first, new, rows, staging]
        head = n_first + 1
        mass = jnp.concatenate([mass_cand[..., :head], mass_rows, mass_cand[..., head:]], axis=2)
        mass = jnp.where(real[:, None, None], mass, 0.0)
    new = core.write(state, k, v, pos, valid, fmt, policy, mass, sections)
    return out[:, None].astype(q.dtype), new
