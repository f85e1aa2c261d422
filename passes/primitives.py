"""The semantic ops models are written in.

`linear(x, w)` takes w as [D_out, D_in] (x @ w.T), the layout of the checkpoints.

Each op is a JAX primitive with an abstract eval and a pure-jnp reference; the
reference is also the CPU lowering, so it is written to be fast under XLA:CPU.
Pallas kernels are registered as the `tpu` / `cuda` lowerings in
`pallax.pallas_kernels.lowerings`; model code never chooses a kernel.

Shape letters: B batch, T query length, S cache length, N heads, K kv heads,
H head dim, D model dim, F ffn dim, V vocab.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import mlir

F32 = jnp.float32
MLP_KINDS = ("swiglu", "geglu_tanh")
SKINNY_ROWS = 64  # up to this many rows, linear/lm_head use the transposed dot (_dot_rows)


def widen(w: jax.Array) -> jax.Array:
    """Float32 view of a weight, exact for bf16/f16/f32.

    XLA:CPU runs a bf16 matmul by converting the whole operand array; widening a
    bf16 weight with an integer shift and a bitcast is exact and lets XLA fuse
    the conversion into the consumer instead of materialising a float copy.
    """
    if w.dtype == jnp.bfloat16:
        bits = lax.bitcast_convert_type(w, jnp.uint16).astype(jnp.uint32)
        return lax.bitcast_convert_type(lax.shift_left(bits, jnp.uint32(16)), F32)
    return w.astype(F32)


@functools.cache
def _jitted(reference, params: tuple):
    """One jitted reference per (op, params), so eager calls hit jax's compile cache."""
    return jax.jit(functools.partial(reference, **dict(params)))


def _define(name: str, reference, abstract, *, multiple_results: bool = False) -> Primitive:
    prim = Primitive(name)
    prim.multiple_results = multiple_results
    prim.def_impl(lambda *args, **params: _jitted(reference, tuple(sorted(params.items())))(*args))
    prim.def_abstract_eval(abstract)
    mlir.register_lowering(prim, mlir.lower_fun(reference, multiple_results=multiple_results))
    prim.reference = reference  # type: ignore[attr-defined]
    return prim


# --------------------------------------------------------------------------- embed
def embed_reference(ids, table, *, scale):
    """ids [B, T] int32, table [V, D] -> [B, T, D] in table dtype (times `scale`)."""
    if table.dtype in (jnp.bfloat16, jnp.float16):
        # Gather the 16-bit patterns: XLA:CPU runs a 16-bit float gather in float32,
        # converting the whole table, and hoists that convert out of the decode loop
        # (a float32 copy of the table kept in memory).
        bits = jnp.take(lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0, mode="clip")
        rows = lax.bitcast_convert_type(bits, table.dtype)  # [B, T, D]
    else:
        rows = jnp.take(table, ids, axis=0, mode="clip")  # [B, T, D]
    if scale is None:
        return rows
    return (widen(rows) * jnp.asarray(scale, F32)).astype(table.dtype)


def _embed_abstract(ids, table, *, scale):
    del scale
    return ShapedArray((*ids.shape, table.shape[1]), table.dtype)


embed_p = _define("embed", embed_reference, _embed_abstract)


def embed(ids, table, *, scale=None):
    return embed_p.bind(ids, table, scale=None if scale is None else float(scale))


# ------------------------------------------------------------------------ rms_norm
def rms_norm_reference(x, w, *, eps):
    """x [..., D], w [D] -> x.dtype; statistics in float32."""
    x32 = x.astype(F32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return (x32 * lax.rsqrt(var + eps) * widen(w)).astype(x.dtype)


def _rms_norm_abstract(x, w, *, eps):
    del eps
    if w.shape != (x.shape[-1],):
        raise TypeError(f"rms_norm weight shape {w.shape} does not match x {x.shape}")
    return ShapedArray(x.shape, x.dtype)


rms_norm_p = _define("rms_norm", rms_norm_reference, _rms_norm_abstract)


def rms_norm(x, w, *, eps):
    return rms_norm_p.bind(x, w, eps=float(eps))


# -------------------------------------------------------------------------- linear
def linear_reference(x, w):
    """x [..., D_in] against w [D_out, D_in] (x @ w.T) -> x.dtype, accumulated in float32.

    Weights are stored output-major, as in the checkpoints: each output is a dot
    product of two contiguous rows, which XLA:CPU runs ~20% faster at batch 1.
    """
    rows = math.prod(x.shape[:-1])
    if w.dtype == jnp.bfloat16 and x.dtype == jnp.bfloat16 and rows > SKINNY_ROWS:
        # Prefill-sized: XLA:CPU's native bf16 GEMM. Decode-sized (up to SKINNY_ROWS
        # rows): the widened float32 dot of _dot_rows reads the weights faster.
        y = jnp.einsum("...i,oi->...o", x, w, preferred_element_type=F32)
    else:
        y = _dot_rows(x.astype(F32), widen(w), rows)
    return y.astype(x.dtype)


def _dot_rows(x, w, rows):
    """x [..., I] @ w[O, I].T in float32, in the form XLA:CPU runs fastest.

    One row is a GEMV over contiguous weight rows. From 2 to a few dozen rows,
    computing w @ x.T ([O, R]) and transposing afterwards is 1.3-2x faster than
    x @ w.T, but only if XLA is kept from fusing the transpose back into the dot
    (it then picks the slow kernel again): hence the optimization barrier.
    `scripts/bench_matvec.py` measures both forms.
    """
    if rows < 2 or rows > SKINNY_ROWS:
        return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=F32)
    x2 = x.reshape(rows, x.shape[-1])
    y = lax.optimization_barrier(jnp.einsum("oi,ri->or", w, x2, preferred_element_type=F32))
    return y.T.reshape(*x.shape[:-1], w.shape[0])


def _linear_abstract(x, w):
    if x.shape[-1] != w.shape[1]:
        raise TypeError(f"linear: x {x.shape} and w {w.shape} [out, in] do not contract")
    return ShapedArray((*x.shape[:-1], w.shape[0]), x.dtype)


linear_p = _define("linear", linear_reference, _linear_abstract)


def linear(x, w):
    return linear_p.bind(x, w)


# ------------------------------------------------------------------------- qlinear
INT8_MAX = 127.0


def quantize_rows(x):
    """Symmetric int8 per row (LLM.int8()'s vector-wise scheme): x ~ q * scale[..., None]."""
    x32 = x.astype(F32)
    scale = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / INT8_MAX
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def _w8a8(x2, q, scale):
    """x2 [R, I] float32 against per-channel int8 q [O, I]: int8 x int8 -> int32 dot."""
    rows = x2.shape[0]
    xq, xs = quantize_rows(x2)
    if rows == 1:
        xq = jnp.concatenate([xq, jnp.zeros_like(xq)])
    dims = (((1,), (1,)), ((), ()))
    if 4 < rows <= SKINNY_ROWS:
        acc = lax.optimization_barrier(
            lax.dot_general(q, xq, dims, preferred_element_type=jnp.int32)
        ).T
    else:
        acc = lax.dot_general(xq, q, dims, preferred_element_type=jnp.int32)[:rows]
    return acc.astype(F32) * xs * scale.reshape(-1).astype(F32)


def dequantize_groups(data, scale, offset, *, bits, group_size, in_features, padded=False):
    """The float32 matrix [O, I] of a packed weight (see passes/qformat.py); [O, Ip] with
    the padding columns of a partial last group when `padded`."""
    o = data.shape[0]
    if bits == 4:
        d = data.reshape(o, -1, group_size // 2)
        v = jnp.concatenate([d & 15, d >> 4], axis=-1)  # [O, G, g]
    else:
        v = data.reshape(o, -1, group_size)
    f = v.astype(F32) * scale[..., None]
    if offset is not None:
        f = f + offset[..., None]
    f = f.reshape(o, -1)
    return f if padded else f[:, :in_features]


def qlinear_frame(
    matmul, x, data, scale, *rest, bits, group_size, in_features, offset, outliers, out_dtype=None
):
    """The parts of `qlinear` every lowering shares, around a `matmul` that multiplies.

    Flattens x to float32 rows [R, I]; with `outliers`, takes the listed input features
    out (LLM.int8()'s decomposition: they multiply in float32 against `outlier_w`);
    zero-pads x to whole groups [R, G * g] (rather than slicing the weight: a slice
    between a dequantizing fusion and the dot makes XLA:CPU materialize the float
    weight); then `matmul(x2, data, scale, offset_or_None, bits=, group_size=)` gives the
    float32 [R, O] product with the packed weight.
    """
    rest = list(rest)
    off = rest.pop(0) if offset else None
    idx, w_out = (rest[0], rest[1]) if outliers else (None, None)
    lead, d_in = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    x2 = x.reshape(rows, d_in).astype(F32)
    if idx is not None:
        x_out = jnp.take(x2, idx, axis=1)
        # A [I] mask multiply fuses into the row quantization; a scatter into x would not.
        x2 = x2 * jnp.ones((d_in,), F32).at[idx].set(0.0)
    padded = scale.shape[1] * group_size
    if padded > d_in:
        x2 = jnp.pad(x2, ((0, 0), (0, padded - d_in)))
    y = matmul(x2, data, scale, off, bits=bits, group_size=group_size)
    if idx is not None:
        y = y + _dot_rows(x_out, w_out.astype(F32), rows)
    return y.reshape(*lead, data.shape[0]).astype(out_dtype or x.dtype)


def qmatmul_xla(x2, data, scale, off, *, bits, group_size):
    """x2 [R, G * g] float32 against a packed weight -> [R, O] float32, in XLA ops.

    Per-output-channel int8 (LLM.int8()'s vector-wise scheme) runs as W8A8 up to
    SKINNY_ROWS rows (decode): activations are quantized to int8 per row on the fly
    and the dot runs in integers with int32 accumulation. On XLA:CPU the int8 x int8 ->
    int32 dot reads the int8 bytes directly and runs 1.2-1.9x faster than the float32
    dot from 2 rows up. Above that (prefill, score), where the GEMM is compute-bound
    and dequantizing the weight costs little, it is weight-only: one scale per row of
    activations costs SmolLM2 +4.0% perplexity against +0.6% through the CPU kernel's
    per-32 blocks (scripts/eval_ppl.py, --chunk-size 128 vs 64). Group-wise weights
    (int4, or int8 kept from a GGUF file) are unpacked and dequantized inside the
    step, in a fusion that reads the packed bytes, and multiplied in float32.
    """
    if bits == 8 and off is None and scale.shape[1] == 1 and x2.shape[0] <= SKINNY_ROWS:
        return _w8a8(x2, data, scale)
    w = dequantize_groups(
        data, scale, off, bits=bits, group_size=group_size, in_features=x2.shape[1], padded=True
    )
    return _dot_rows(x2, w, x2.shape[0])


def qlinear_reference(x, data, scale, *rest, **params):
    """x [..., I] against a packed weight [O, I] (passes/qformat.py) -> x.dtype (or
    `out_dtype`), in XLA ops: `qlinear_frame` around `qmatmul_xla`.

    This is the lowering on every platform without its own rule. On CPU,
    `pallax.cpu_kernels` registers one that multiplies decode-sized rows in a C++
    kernel and keeps this for the rest.
    """
    return qlinear_frame(qmatmul_xla, x, data, scale, *rest, **params)


def _qlinear_abstract(
    x, data, scale, *rest, bits, group_size, in_features, offset, outliers, out_dtype=None
):
    o = data.shape[0]
    groups = -(-in_features // group_size)
    want = (o, groups * group_size // (2 if bits == 4 else 1))
    if x.shape[-1] != in_features or tuple(data.shape) != want:
        raise TypeError(
            f"qlinear: x {x.shape} and packed int{bits} data {data.shape} (g{group_size}, "
            f"{in_features} in) disagree"
        )
    if data.dtype != (jnp.uint8 if bits == 4 else jnp.int8) or scale.shape != (o, groups):
        raise TypeError(f"qlinear: data {data.dtype} / scale {scale.shape} malformed")
    if len(rest) != int(offset) + 2 * int(outliers):
        raise TypeError(f"qlinear: {len(rest)} extra operands for {offset=} {outliers=}")
    return ShapedArray((*x.shape[:-1], o), jnp.dtype(out_dtype or x.dtype))


qlinear_p = _define("qlinear", qlinear_reference, _qlinear_abstract)
qlinear_p.pallax_semantic = True  # type: ignore[attr-defined]


def qlinear(x, w, *, out_dtype=None):
    """x @ w.T for a `QuantizedWeight` w (passes/qformat.py); out_dtype defaults to x's."""
    rest = [a for a in (w.offset, w.outlier_idx, w.outlier_w) if a is not None]
    return qlinear_p.bind(
        x,
        w.data,
        w.scale,
        *rest,
        bits=w.bits,
        group_size=w.group_size,
        in_features=w.in_features,
        offset=w.offset is not None,
        outliers=w.outlier_idx is not None,
        out_dtype=None if out_dtype is None else jnp.dtype(out_dtype).name,
    )


# -------------------------------------------------------------------------- qembed
def qembed_reference(
    ids, data, scale, *rest, bits, group_size, in_features, offset, scale_by, dtype, outliers=False
):
    """Rows of a packed table [V, D] gathered and dequantized -> [B, T, D] `dtype` (outlier
    columns, when the table has them, put back from their float32 values)."""
    take = functools.partial(jnp.take, indices=ids.reshape(-1), axis=0, mode="clip")
    rest = list(rest)
    off = take(rest.pop(0)) if offset else None
    rows = dequantize_groups(
        take(data), take(scale), off, bits=bits, group_size=group_size, in_features=in_features
    )
    if outliers:
        idx, w_out = rest
        rows = rows.at[:, idx].set(take(w_out).astype(F32))
    if scale_by is not None:
        rows = rows * jnp.asarray(scale_by, F32)
    return rows.reshape(*ids.shape, in_features).astype(dtype)


def _qembed_abstract(
    ids, data, scale, *rest, bits, group_size, in_features, offset, scale_by, dtype, outliers=False
):
    return ShapedArray((*ids.shape, in_features), jnp.dtype(dtype))


qembed_p = _define("qembed", qembed_reference, _qembed_abstract)
qembed_p.pallax_semantic = True  # type: ignore[attr-defined]


def qembed(ids, w, *, scale=None, dtype=jnp.float32):
    rest = [a for a in (w.offset, w.outlier_idx, w.outlier_w) if a is not None]
    return qembed_p.bind(
        ids,
        w.data,
        w.scale,
        *rest,
        bits=w.bits,
        group_size=w.group_size,
        in_features=w.in_features,
        offset=w.offset is not None,
        scale_by=None if scale is None else float(scale),
        dtype=jnp.dtype(dtype).name,
        outliers=w.outlier_idx is not None,
    )


# ---------------------------------------------------------------------------- rope
def rope_reference(x, positions, *, theta, scaling=1.0):
    """Rotary embedding, rotate-half layout. x [B, T, N, H], positions [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=F32) * 2.0 / x.shape[-1]))
    angles = (positions.astype(F32) / scaling)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(F32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _rope_abstract(x, positions, *, theta, scaling):
    del theta, scaling
    if positions.shape != x.shape[:2]:
        raise TypeError(f"rope: positions {positions.shape} vs x {x.shape}")
    return ShapedArray(x.shape, x.dtype)


rope_p = _define("rope", rope_reference, _rope_abstract)


def rope(x, positions, *, theta, scaling=1.0):
    return rope_p.bind(x, positions, theta=float(theta), scaling=float(scaling))


# ----------------------------------------------------------------------- attention
def write_kv(cache, new, pos):
    """cache [B, K, S, H] <- new [B, T, K, H] at rows pos[b] .. pos[b] + T."""
    new = jnp.swapaxes(new, 1, 2).astype(cache.dtype)  # [B, K, T, H]
    return jax.vmap(lambda c, n, p: lax.dynamic_update_slice(c, n, (0, p, 0)))(cache, new, pos)


def attention_mask(pos, t, s, sliding_window):
    """[B, T, S] bool: query at pos[b] + t sees key j iff j <= it (and within the window)."""
    q_pos = pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    k_pos = jnp.arange(s, dtype=jnp.int32)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    return mask


def attention_core(q, k_cache, v_cache, pos, *, scale, sliding_window, softcap):
    """Grouped-query attention of q [B, T, N, H] over the cache [B, K, S, H]."""
    b, t, n, h = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    if t == 1:
        return _decode_attention_core(q, k_cache, v_cache, pos, scale, sliding_window, softcap)
    qg = q.astype(F32).reshape(b, t, kv, n // kv, h) * scale
    logits = jnp.einsum("BTKGH,BKSH->BKGTS", qg, k_cache.astype(F32), preferred_element_type=F32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    mask = attention_mask(pos, t, s, sliding_window)  # [B, T, S]
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v_cache.astype(F32), preferred_element_type=F32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def _decode_attention_core(q, k_cache, v_cache, pos, scale, sliding_window, softcap):
    """Single-token attention, laid out so XLA:CPU batches the dots over (B, K)."""
    b, _, n, h = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    qg = q.astype(F32).reshape(b, kv, n // kv, h) * scale  # [B, K, G, H]
    logits = jnp.einsum("BKGH,BKSH->BKGS", qg, k_cache.astype(F32), preferred_element_type=F32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    mask = attention_mask(pos, 1, s, sliding_window)[:, 0]  # [B, S]
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("BKGS,BKSH->BKGH", probs, v_cache.astype(F32), preferred_element_type=F32)
    return out.reshape(b, 1, n, h).astype(q.dtype)


def attention_reference(q, k, v, k_cache, v_cache, pos, *, scale, sliding_window, softcap):
    """Write k/v [B, T, K, H] into the caches at pos [B], then attend causally.

    Returns (out [B, T, N, H], k_cache, v_cache). Cache slots outside a query's
    causal (and sliding) window may hold any finite values: their logits are
    replaced with -inf by `where` and their values are weighted by zero.
    """
    if q.shape[1] == 1:
        out = decode_attention_split(
            q, k, v, k_cache, v_cache, pos, scale=scale, sliding_window=sliding_window,
            softcap=softcap,
        )  # fmt: skip
        return out, write_kv(k_cache, k, pos), write_kv(v_cache, v, pos)
    k_cache = write_kv(k_cache, k, pos)
    v_cache = write_kv(v_cache, v, pos)
    out = attention_core(
        q, k_cache, v_cache, pos, scale=scale, sliding_window=sliding_window, softcap=softcap
    )
    return out, k_cache, v_cache


def decode_attention_split(q, k, v, k_cache, v_cache, pos, *, scale, sliding_window, softcap):
    """Single-token attention of q [B, 1, N, H] at pos [B] over the cache *before* the
    write (slots < pos, within the window) plus the new k, v [B, 1, K, H] itself.

    Equal to writing k, v at pos and attending (`attention_core`), but the dots read
    the cache the decode loop carries rather than the written one. Attending over the
    written cache makes XLA:CPU fuse the write twice (once into the dot's operand) and
    copy every cache array to keep the loop's in place: 4 copies of each cache array a
    step; this way, 2 (SmolLM2 at batch 1, context 256: 84 -> 91 tok/s). The CPU kernel
    (cpu_kernels/attention.cc) writes in place and copies nothing.
    """
    b, _, n, h = q.shape
    kv, s = k_cache.shape[1], k_cache.shape[2]
    qg = q.astype(F32).reshape(b, kv, n // kv, h) * scale  # [B, K, G, H]
    k_new = k[:, 0].astype(k_cache.dtype).astype(F32)  # [B, K, H], as the cache holds it
    v_new = v[:, 0].astype(v_cache.dtype).astype(F32)
    logits = jnp.einsum("BKGH,BKSH->BKGS", qg, k_cache.astype(F32), preferred_element_type=F32)
    own = jnp.einsum("BKGH,BKH->BKG", qg, k_new, preferred_element_type=F32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
        own = softcap * jnp.tanh(own / softcap)
    k_pos = jnp.arange(s, dtype=jnp.int32)[None, :]
    mask = k_pos < pos[:, None]  # [B, S]: the earlier tokens; slot pos is stale
    if sliding_window is not None:
        mask &= k_pos > pos[:, None] - sliding_window
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    top = jnp.maximum(jnp.max(logits, axis=-1), own)  # [B, K, G]; own is finite
    probs = jnp.exp(logits - top[..., None])
    p_own = jnp.exp(own - top)
    denom = jnp.sum(probs, axis=-1) + p_own
    out = jnp.einsum("BKGS,BKSH->BKGH", probs, v_cache.astype(F32), preferred_element_type=F32)
    out = (out + p_own[..., None] * v_new[:, :, None, :]) / denom[..., None]
    return out.reshape(b, 1, n, h).astype(q.dtype)


def _attention_abstract(q, k, v, k_cache, v_cache, pos, *, scale, sliding_window, softcap):
    del scale, sliding_window, softcap
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h:
        raise TypeError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} disagree")
    kv = k.shape[2]
    if n % kv:
        raise TypeError(f"attention: {n=} query heads not divisible by {kv=} kv heads")
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != (b, kv) or k_cache.shape[3] != h:
        raise TypeError(f"attention: cache {k_cache.shape} does not match k {k.shape}")
    if pos.shape != (b,):
        raise TypeError(f"attention: pos {pos.shape} must be [{b}]")
    return (
        ShapedArray(q.shape, q.dtype),
        ShapedArray(k_cache.shape, k_cache.dtype),
        ShapedArray(v_cache.shape, v_cache.dtype),
    )


attention_p = _define("attention", attention_reference, _attention_abstract, multiple_results=True)


def attention(q, k, v, k_cache, v_cache, pos, *, scale=None, sliding_window=None, softcap=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return attention_p.bind(
        q,
        k,
        v,
        k_cache,
        v_cache,
        pos,
        scale=scale,
        sliding_window=None if sliding_window is None else int(sliding_window),
        softcap=None if softcap is None else float(softcap),
    )


# ------------------------------------------------------------------------- mlp_act
def mlp_act_reference(gate, up, *, kind):
    """SwiGLU: silu(gate) * up; GeGLU: gelu_tanh(gate) * up. Computed in float32."""
    g = gate.astype(F32)
    if kind == "swiglu":
        act = g * jax.nn.sigmoid(g)
    else:
        act = jax.nn.gelu(g, approximate=True)
    return (act * up.astype(F32)).astype(gate.dtype)


def _mlp_act_abstract(gate, up, *, kind):
    if kind not in MLP_KINDS:
        raise TypeError(f"mlp_act {kind=} not in {MLP_KINDS}")
    if gate.shape != up.shape:
        raise TypeError(f"mlp_act: gate {gate.shape} vs up {up.shape}")
    return ShapedArray(gate.shape, gate.dtype)


mlp_act_p = _define("mlp_act", mlp_act_reference, _mlp_act_abstract)


def mlp_act(gate, up, *, kind):
    return mlp_act_p.bind(gate, up, kind=kind)


# ------------------------------------------------------------------------- lm_head
def lm_head_reference(x, table, *, softcap):
    """x [..., D] against the (tied) table [V, D] -> float32 logits [..., V]."""
    logits = _dot_rows(x.astype(F32), widen(table), math.prod(x.shape[:-1]))
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


def _lm_head_abstract(x, table, *, softcap):
    del softcap
    if x.shape[-1] != table.shape[1]:
        raise TypeError(f"lm_head: x {x.shape} vs table {table.shape}")
    return ShapedArray((*x.shape[:-1], table.shape[0]), F32)


lm_head_p = _define("lm_head", lm_head_reference, _lm_head_abstract)


def lm_head(x, table, *, softcap=None):
    return lm_head_p.bind(x, table, softcap=None if softcap is None else float(softcap))


SEMANTIC_PRIMITIVES = (embed_p, rms_norm_p, linear_p, rope_p, attention_p, mlp_act_p, lm_head_p)
