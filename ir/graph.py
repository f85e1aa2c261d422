"""The graph pallax compiles: closed jaxprs over semantic ops, plus named weights.

A `Graph` holds one jaxpr per step ("prefill", "decode", "chunk"), the weights
they read (by name; a value may be a pytree once a pass packs it), the KV-cache
layout the steps expect, and metadata. Every step's inputs are the flattened
(weights, cache, *args); its outputs are (logits, cache).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

STEP_NAMES = ("prefill", "decode", "chunk")


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """KV-cache arrays by name: shape templates over the symbols "B" and "S"."""

    entries: tuple[tuple[str, tuple[str | int, ...], str], ...]
    kind: str = "dense"

    @classmethod
    def dense(cls, shapes: dict[str, tuple[str | int, ...]], dtype) -> CacheLayout:
        name = jnp.dtype(dtype).name
        return cls(tuple((k, tuple(s), name) for k, s in sorted(shapes.items())))

    def with_dtype(self, dtype) -> CacheLayout:
        """The layout with its float k / v entries in `dtype` (packed data and the
        scales of a quantized cache keep theirs)."""
        name = jnp.dtype(dtype).name

        def cast(k, d):
            quant = k.endswith((".scale", ".zero", ".score"))  # compressed-cache metadata
            keep = quant or not jnp.issubdtype(jnp.dtype(d), jnp.floating)
            return d if keep else name

        return dataclasses.replace(
            self, entries=tuple((k, s, cast(k, d)) for k, s, d in self.entries)
        )

    def shapes(self, batch: int, seq: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Concrete shapes: "B" and "S" are the batch and cache length; "S/g" is
        ceil(S / g) (per-group arrays of a quantized cache); ints are fixed sizes."""
        sizes = {"B": batch, "S": seq}

        def size(d):
            if isinstance(d, int):
                return d
            if d in sizes:
                return sizes[d]
            name, _, div = d.partition("/")
            return -(-sizes[name] // int(div))

        return {
            name: jax.ShapeDtypeStruct(tuple(size(d) for d in shape), jnp.dtype(dtype))
            for name, shape, dtype in self.entries
        }

    def allocate(self, batch: int, seq: int, sharding=None) -> dict[str, jax.Array]:
        return {
            k: jnp.zeros(s.shape, s.dtype, device=sharding)
            for k, s in self.shapes(batch, seq).items()
        }

    def _bytes(self, seq: int) -> int:
        return sum(
            int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize
            for s in self.shapes(1, seq).values()
        )

    def bytes_per_token(self) -> float:
        """Cache bytes each token of a sequence adds (all layers); 0 for a fixed-size
        cache. Measured over 4096 tokens, so per-group scales count exactly."""
        n = 4096
        per = (self._bytes(2 * n) - self._bytes(n)) / n
        return int(per) if per == int(per) else per

    def fixed_bytes(self) -> int:
        """Cache bytes a sequence takes whatever its length (a residual window, a
        fixed-size cache)."""
        return int(round(self._bytes(4096) - 4096 * self.bytes_per_token()))


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static shapes of one captured step: batch B, query length T, cache length S."""

    name: str
    batch: int
    length: int
    cache_len: int

    def __post_init__(self):
        if self.name not in STEP_NAMES:
            raise ValueError(f"step {self.name!r} not in {STEP_NAMES}")

    def args(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        i32 = jnp.int32
        tokens = jax.ShapeDtypeStruct((self.batch, self.length), i32)
        pos = jax.ShapeDtypeStruct((self.batch,), i32)
        if self.name == "prefill":
            return (tokens, pos, pos)
        return (tokens, pos)


@dataclasses.dataclass(frozen=True)
class Step:
    spec: StepSpec
    jaxpr: jcore.ClosedJaxpr
    in_tree: Any
    out_tree: Any
    input_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Graph:
    steps: dict[str, Step]
    weights: dict[str, Any]
    cache: CacheLayout
    meta: dict[str, Any]

    def step(self, name: str) -> Step:
        if name not in self.steps:
            raise ValueError(f"graph has no step {name!r}; it has {sorted(self.steps)}")
        return self.steps[name]

    def replace(self, **changes) -> Graph:
        return dataclasses.replace(self, **changes)

    def run(self, name: str, weights, cache, *args):
        """Evaluate a step's jaxpr (binds the semantic primitives: lowers per platform)."""
        step = self.steps[name]
        flat, tree = jax.tree.flatten((weights, cache, *args))
        if tree != step.in_tree:
            raise ValueError(
                f"inputs to step {name!r} do not match the graph: {tree} vs {step.in_tree}"
            )
        out = jcore.jaxpr_as_fun(step.jaxpr)(*flat)
        return jax.tree.unflatten(step.out_tree, out)

    def weight_bytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(self.weights))


def _names(weights, cache, args) -> tuple[str, ...]:
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(weights)[0]:
        names.append(".".join(_key(p) for p in path))
    for path, _ in jax.tree_util.tree_flatten_with_path(cache)[0]:
        names.append("cache:" + ".".join(_key(p) for p in path))
    arg_names = ("tokens", "pos", "logits_index")
    names.extend(arg_names[: len(args)])
    return tuple(names)


def _key(p) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(p, attr):
            return str(getattr(p, attr))
    return str(p)


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def trace_step(fn: Callable, spec: StepSpec, weights, cache: CacheLayout) -> Step:
    """Trace fn(weights, cache, *args) -> (logits, cache) into a Step."""
    cache_avals = cache.shapes(spec.batch, spec.cache_len)
    args = spec.args()
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(abstract(weights), cache_avals, *args)
    in_tree = jax.tree.structure((abstract(weights), cache_avals, *args))
    out_tree = jax.tree.structure(out_shape)
    return Step(spec, closed, in_tree, out_tree, _names(weights, cache_avals, args))


def capture(forward: Callable, weights, cache: CacheLayout, specs, meta) -> Graph:
    """Trace a model's forward(weights, cache, tokens, pos, logits_index) per step spec."""

    def make(spec: StepSpec):
        if spec.name == "prefill":
            return lambda w, c, tokens, pos, last: forward(w, c, tokens, pos, last)

        if spec.name == "decode":

            def decode(w, c, tokens, pos):
                logits, c = forward(w, c, tokens, pos, None)
                return logits[:, 0], c

            return decode
        return lambda w, c, tokens, pos: forward(w, c, tokens, pos, None)

    steps = {s.name: trace_step(make(s), s, weights, cache) for s in specs}
    graph = Graph(steps=steps, weights=dict(weights), cache=cache, meta=dict(meta))
    from pallax.ir.verify import verify

    verify(graph)
    return graph
