"""How fast XLA:CPU reads weights in a decode-shaped loop, by weight dtype and matmul form.

    python -m pallax.scripts.bench_matvec --batch 1 8

Runs 16 steps of 30 layers of x -> tanh(x @ A.T) @ B.T (A [1536, 576], B [576, 1536],
SmolLM2's MLP shapes) inside one jitted fori_loop and prints the median ms per step
for: float32 weights as x @ W.T and as (W @ x.T).T behind an optimization barrier;
bfloat16 weights widened to float32 with a shift and bitcast (both forms); bfloat16
weights in a native bf16 dot; and bf16 as multiply + reduce. This is the
measurement behind the `linear` CPU lowering choices in ir/primitives/.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

from pallax.ir.primitives import widen

D, F, LAYERS, STEPS = 576, 1536, 30, 16


def _dot(x, w):
    return jnp.einsum("bi,oi->bo", x, widen(w))


def _transposed(x, w):
    """w @ x.T behind an optimization barrier, then transposed: pallax's `_dot_rows`."""
    y = lax.optimization_barrier(jnp.einsum("oi,bi->ob", widen(w), x))
    return y.T


def _reduce(x, w):
    return jnp.sum(x[:, None, :] * widen(w)[None], axis=-1)


def _native(x, w):
    return jnp.einsum("bi,oi->bo", x.astype(w.dtype), w, preferred_element_type=jnp.float32)


FORMS = {
    "f32 dot": (_dot, jnp.float32),
    "f32 transposed dot": (_transposed, jnp.float32),
    "bf16 widened dot": (_dot, jnp.bfloat16),
    "bf16 widened transposed": (_transposed, jnp.bfloat16),
    "bf16 native dot": (_native, jnp.bfloat16),
    "bf16 multiply+reduce": (_reduce, jnp.bfloat16),
}


def time_form(batch: int, fn, dtype, repeats: int = 3) -> float:
    key = jax.random.key(0)
    a = [jax.random.normal(jax.random.fold_in(key, i), (F, D)).astype(dtype) for i in range(LAYERS)]
    b = [
        jax.random.normal(jax.random.fold_in(key, 99 + i), (D, F)).astype(dtype)
        for i in range(LAYERS)
    ]

    @jax.jit
    def loop(x, a, b):
        def body(_, x):
            for i in range(LAYERS):
                x = x + 0.02 * fn(jnp.tanh(0.02 * fn(x, a[i])), b[i])
            return x

        return lax.fori_loop(0, STEPS, body, x)

    x = jnp.ones((batch, D), jnp.float32)
    loop(x, a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loop(x, a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / STEPS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)
    for batch in args.batch:
        for name, (fn, dtype) in FORMS.items():
            ms = time_form(batch, fn, dtype) * 1e3
            print(f"batch {batch:2d} | {name:22s} | {ms:7.2f} ms/step", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
