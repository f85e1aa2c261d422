"""Structural checks run after every pass."""

from __future__ import annotations

import jax
from jax.extend import core as jcore

from pallax.ir.graph import Graph, abstract


class GraphError(ValueError):
    """A pass produced a graph that does not type-check or does not fit its weights."""


def verify(graph: Graph) -> None:
    """Type-check every step, and check it reads the graph's weights and cache layout.

    The cache a step returns must have exactly the layout it reads, so that decode
    can run in a loop with the cache donated and updated in place.
    """
    weights = abstract(graph.weights)
    for name, step in graph.steps.items():
        try:
            jcore.check_jaxpr(step.jaxpr.jaxpr)
        except Exception as e:
            raise GraphError(f"step {name!r} does not type-check: {e}") from e
        cache = graph.cache.shapes(step.spec.batch, step.spec.cache_len)
        leaves = jax.tree.leaves((weights, cache, *step.spec.args()))
        invars = step.jaxpr.jaxpr.invars
        if len(leaves) != len(invars):
            raise GraphError(
                f"step {name!r} reads {len(invars)} inputs, graph provides {len(leaves)}"
            )
        for i, (leaf, var) in enumerate(zip(leaves, invars, strict=True)):
            aval = var.aval
            if tuple(aval.shape) != tuple(leaf.shape) or aval.dtype != leaf.dtype:
                raise GraphError(
                    f"step {name!r} input {step.input_names[i]!r}: graph has "
                    f"{leaf.dtype}{list(leaf.shape)}, jaxpr expects {aval.dtype}{list(aval.shape)}"
                )
        out_cache = jax.tree.leaves(jax.tree.unflatten(step.out_tree, step.jaxpr.out_avals)[1])
        for leaf, aval in zip(jax.tree.leaves(cache), out_cache, strict=True):
            if tuple(aval.shape) != tuple(leaf.shape) or aval.dtype != leaf.dtype:
                raise GraphError(
                    f"step {name!r} returns a cache entry {aval.dtype}{list(aval.shape)} "
                    f"that differs from its layout {leaf.dtype}{list(leaf.shape)}"
                )
