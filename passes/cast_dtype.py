"""cast: weights, activations and the KV cache to a floating dtype (e.g. bfloat16).

Semantic ops compute in float32 internally and return their input's dtype, so
casting the weights and the cache is enough: re-tracing the graph propagates the
dtype through every op. Logits stay float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallax.ir import primitives
from pallax.ir.graph import Graph
from pallax.ir.lazy import LazyWeight
from pallax.ir.manager import map_weights
from pallax.ir.qformat import QuantizedWeight
from pallax.ir.rewrite import rewrite

CAST_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Cast:
    dtype: str = "bfloat16"
    activations: bool = True
    name: str = dataclasses.field(default="cast", init=False)

    def __post_init__(self):
        if self.dtype not in CAST_DTYPES:
            raise ValueError(f"cast dtype {self.dtype!r} is not supported; allowed: {CAST_DTYPES}")

    def __call__(self, graph: Graph) -> Graph:
        dtype = jnp.dtype(self.dtype)

        def convert(weights):
            def one(w):
                if isinstance(w, LazyWeight):  # converted as it is read
                    return w.astype(dtype) if jnp.issubdtype(w.dtype, jnp.floating) else w
                if isinstance(w, jax.ShapeDtypeStruct):  # an abstract weight (no values)
                    float_ = jnp.issubdtype(w.dtype, jnp.floating)
                    return jax.ShapeDtypeStruct(w.shape, dtype if float_ else w.dtype)
                if jnp.issubdtype(w.dtype, jnp.floating):
                    return jax.device_put(jnp.asarray(w).astype(dtype))
                return w

            # Packed weights keep their float32 scales: bf16 scales would add error for nothing.
            return {
                k: v if isinstance(v, QuantizedWeight) else jax.tree.map(one, v)
                for k, v in weights.items()
            }

        weights = map_weights(("cast", self.dtype), graph.weights, convert)
        rules = {}
        if not self.activations:

            def embed_f32(eqn, ids, table):
                return eqn.primitive.bind(ids, table, **eqn.params).astype(jnp.float32)

            rules[primitives.embed_p] = embed_f32
        else:
            # A packed table's embedding states its output dtype; activations follow it.
            def qembed_cast(eqn, ids, *arrays):
                return eqn.primitive.bind(ids, *arrays, **{**eqn.params, "dtype": self.dtype})

            rules[primitives.qembed_p] = qembed_cast
        graph = rewrite(graph, rules, weights=weights, cache=graph.cache.with_dtype(dtype))
        return graph.replace(meta={**graph.meta, "dtype": self.dtype, "kv_dtype": self.dtype})


def cast(dtype: str = "bfloat16", *, activations: bool = True) -> Cast:
    """The cast pass: weights, KV cache and (unless activations=False) activations to `dtype`."""
    if not isinstance(dtype, str):
        dtype = jnp.dtype(dtype).name
    return Cast(dtype, activations)
