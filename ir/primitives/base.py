"""The shared machinery of the semantic ops: defining a primitive with its reference
lowering, and the float32 widening the references use.

The semantic ops models are written in (see `pallax.ir.primitives`).

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

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import mlir

F32 = jnp.float32
MLP_KINDS = ("swiglu", "geglu_tanh")
SKINNY_ROWS = 64  # batch-variant: up to this many rows, _dot_rows uses the transposed dot

# Batch invariance (on by default): every matmul reduces each row in an order fixed by the
# row alone, so a request's tokens never depend on what else is in its batch. The method
# of a matmul is chosen by the role of its rows (`per_token`: a decode step's one token per
# sequence, or a prefill chunk's tokens), never by how many rows there are. Each method is
# row-invariant: XLA:CPU's float GEMM from two rows up (one row would take its
# matrix-vector product, which sums in another order: it is padded to two), the C++
# kernels of pallax.cpu_kernels, integer dots. False restores the row-count thresholds
# (SKINNY_ROWS here; MAX_ROWS, BF16_MAX_ROWS in cpu_kernels), a little faster at some batch
# sizes and not invariant. Read when a step is traced: set it before compiling.
BATCH_INVARIANT = True


def row_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis, batch-invariant: in lanes of 16 (more past 1,024 elements)
    added chunk by chunk in order, then the lanes halved pairwise. Elementwise adds, which
    XLA does not reorder, so the order is fixed by the row's length alone; `jnp.sum` lets
    XLA:CPU vectorize a reduction differently for one row than for eight."""
    if not BATCH_INVARIANT:
        return jnp.sum(x, axis=-1)
    d, lanes = x.shape[-1], 16
    while d > 64 * lanes:
        lanes *= 2
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -d % lanes)])
    acc = x[..., :lanes]
    for c in range(1, x.shape[-1] // lanes):
        acc = acc + x[..., c * lanes : (c + 1) * lanes]
    while lanes > 1:
        lanes //= 2
        acc = acc[..., :lanes] + acc[..., lanes:]
    return acc[..., 0]


def fence(y: jax.Array) -> jax.Array:
    """An op's result kept out of its consumers' fusions (batch-invariant only).

    Gemma's scaled embedding (`embed` / `qembed` with a scale), left to XLA:CPU, is fused
    into the first norm and residual add differently by shape: inside a shard_map on one
    device its float32 scores moved by up to 1.4e-5, and int8 rounding carried that to
    other greedy tokens on a mesh. Behind this barrier they are bit-equal (one device)
    and within 4.8e-7 on every 8-device mesh. (A barrier after `rms_norm` does not keep
    XLA:CPU from fusing the norm into the residual add that follows it.)"""
    return lax.optimization_barrier(y) if BATCH_INVARIANT else y


def per_token(x) -> bool:
    """Whether x [..., T, D] is a decode step's rows: one token per sequence (T = 1, or a
    2-D [R, D] of independent rows), rather than a prefill chunk's tokens."""
    return x.ndim < 3 or x.shape[-2] == 1


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


def _dot_rows(x, w, rows):
    """x [..., I] @ w[O, I].T in float32, in the form XLA:CPU runs fastest.

    One row is a GEMV over contiguous weight rows. From 2 to a few dozen rows,
    computing w @ x.T ([O, R]) and transposing afterwards is 1.3-2x faster than
    x @ w.T, but only if XLA is kept from fusing the transpose back into the dot
    (it then picks the slow kernel again): hence the optimization barrier. That is the
    batch-variant form; under BATCH_INVARIANT every row count runs the GEMM.
    `scripts/bench_matvec.py` measures both forms.
    """
    if BATCH_INVARIANT:  # XLA's GEMM, whose rows do not depend on each other; one row padded
        x2 = x.reshape(rows, x.shape[-1])
        if rows == 1:
            x2 = jnp.concatenate([x2, jnp.zeros_like(x2)])
        y = jnp.einsum("ri,oi->ro", x2, w, preferred_element_type=F32)[:rows]
        return y.reshape(*x.shape[:-1], w.shape[0])
    if rows < 2 or rows > SKINNY_ROWS:
        return jnp.einsum("...i,oi->...o", x, w, preferred_element_type=F32)
    x2 = x.reshape(rows, x.shape[-1])
    y = lax.optimization_barrier(jnp.einsum("oi,ri->or", w, x2, preferred_element_type=F32))
    return y.T.reshape(*x.shape[:-1], w.shape[0])
