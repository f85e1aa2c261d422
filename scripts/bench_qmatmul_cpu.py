"""Quantized matmul on CPU: XLA's forms against the FFI kernel (pallax.cpu_kernels).

    python -m pallax.scripts.bench_qmatmul_cpu --rows 1 8

Runs `--steps` (16) steps of 30 SmolLM2-135M layers (q [576, 576], k and v [192, 576], o [576, 576],
gate and up [1536, 576], down [576, 1536]: 210 matmuls a step) inside one jitted
fori_loop, every layer with its own weights, and prints the median ms per step of
`--repeats` runs for: float32 weights (primitives.linear_reference); per-channel int8
as W8A8 and int4 dequantized in the step (primitives.qlinear_reference); and the FFI
kernel on int4 g32 / g128 with offsets, int8 g32 and per-channel int8. Weight values
are random bytes: the time does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallax import cpu_kernels
from pallax.ir import primitives

D, F, KV, LAYERS = 576, 1536, 192, 30
SHAPES = {
    "q": (D, D),
    "k": (KV, D),
    "v": (KV, D),
    "o": (D, D),
    "gate": (F, D),
    "up": (F, D),
    "down": (D, F),
}


def _weight(rng, form, shape):
    """One weight in `form`: a float32 array or (data, scale, offset) packed bytes."""
    o, i = shape
    if form == "f32":
        return rng.standard_normal((o, i), np.float32) / np.float32(np.sqrt(i))
    bits, g = form
    g = g or i
    groups = -(-i // g)  # a partial last group (576 = 4.5 x 128) pads to whole groups
    if bits == 4:
        data = rng.integers(0, 256, (o, groups * g // 2), np.uint8)
        offset = np.full((o, groups), -8e-3, np.float32)
    else:
        data = rng.integers(-127, 128, (o, groups * g), np.int8)
        offset = None
    scale = np.full((o, groups), 1e-3, np.float32)
    return data, scale, offset


def _xla_matmul(x, w, form):
    if form == "f32":
        return primitives.linear_reference(x, w)
    data, scale, offset = w
    bits, g = form
    rest = () if offset is None else (offset,)
    return primitives.qlinear_reference(
        x,
        data,
        scale,
        *rest,
        bits=bits,
        group_size=g or x.shape[-1],
        in_features=x.shape[-1],
        offset=offset is not None,
        outliers=False,
    )


def _ffi_matmul(x, w, form):
    data, scale, offset = w
    bits, g = form
    g = g or x.shape[-1]
    x = jnp.pad(x, ((0, 0), (0, scale.shape[1] * g - x.shape[-1])))
    return cpu_kernels.qmatmul_cpu(x, data, scale, offset, bits=bits, group_size=g)


FORMS = {
    "XLA f32 dot": ("f32", _xla_matmul),
    "XLA int8 per-channel W8A8": ((8, None), _xla_matmul),
    "XLA int4 g32 dequantize": ((4, 32), _xla_matmul),
    "XLA int4 g128 dequantize": ((4, 128), _xla_matmul),
    "FFI int4 g32": ((4, 32), _ffi_matmul),
    "FFI int4 g128": ((4, 128), _ffi_matmul),
    "FFI int8 g32": ((8, 32), _ffi_matmul),
    "FFI int8 per-channel": ((8, None), _ffi_matmul),
}


def _layer(x, w, mm):
    """A decoder layer's matmuls, with enough arithmetic between them to keep all live."""
    q, k, v = mm(x, w["q"]), mm(x, w["k"]), mm(x, w["v"])
    mix = jnp.sum(k * v, axis=-1, keepdims=True) * 1e-3
    x = x + 0.02 * mm(jnp.tanh(q) + mix, w["o"])
    h = jnp.tanh(mm(x, w["gate"])) * mm(x, w["up"])
    return x + 0.02 * mm(h, w["down"])


def time_form(rows: int, form, fn, repeats: int, steps: int = 16) -> float:
    rng = np.random.default_rng(0)
    weights = [{k: _weight(rng, form, s) for k, s in SHAPES.items()} for _ in range(LAYERS)]
    weights = jax.tree.map(jnp.asarray, weights)
    mm = lambda x, w: fn(x, w, form)  # noqa: E731

    @jax.jit
    def loop(x, weights):
        def body(_, x):
            for w in weights:
                x = _layer(x, w, mm)
            return x

        return lax.fori_loop(0, steps, body, x)

    x = jnp.ones((rows, D), jnp.float32)
    loop(x, weights).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loop(x, weights).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="steps per timed loop")
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    args = parser.parse_args(argv)
    if not cpu_kernels.available():
        print("FFI kernel unavailable: its rows time the XLA fallback", flush=True)
    for rows in args.rows:
        for name in args.forms:
            form, fn = FORMS[name]
            ms = time_form(rows, form, fn, args.repeats, args.steps) * 1e3
            print(f"rows {rows:3d} | {name:26s} | {ms:7.2f} ms/step", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
