"""quantize_weights: int8 weights, one scale per output channel (LLM.int8()'s vector-wise scheme).

Rewrites every `linear` whose weight is a graph weight into `qlinear`, whose weight
is an `Int8Weight` (int8 values [O, I] and float32 scales [O]). The weights that
feed `linear` are found in the graph itself, so any architecture is covered.
Embeddings and the LM head are not `linear` equations and stay as they are.

This first slice implements bits=8 with round-to-nearest; int4 groups, GPTQ and
the outlier decomposition are not implemented yet and are refused by name.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from pallax.passes import primitives
from pallax.passes.ir import Graph
from pallax.passes.manager import map_weights
from pallax.passes.rewrite import rewrite

SUPPORTED_BITS = (8,)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """w ~ q * scale[:, None]; q int8 [O, I], scale float32 [O]."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.q.shape


def quantize_int8(w) -> Int8Weight:
    w = np.asarray(jnp.asarray(w, jnp.float32))
    scale = np.abs(w).max(axis=1) / primitives.INT8_MAX
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return Int8Weight(jax.device_put(q), jax.device_put(scale))


def linear_weight_names(graph: Graph) -> set[str]:
    """Names of the weights used as the `w` operand of a `linear`, in any step."""
    names: set[str] = set()
    for step in graph.steps.values():
        jaxpr = step.jaxpr.jaxpr
        by_var = dict(zip(jaxpr.invars, step.input_names, strict=True))
        _collect(jaxpr, by_var, names)
    return {n for n in names if n in graph.weights}


def _collect(jaxpr, by_var: dict, names: set) -> None:
    for eqn in jaxpr.eqns:
        if eqn.primitive is primitives.linear_p:
            w = eqn.invars[1]
            if not isinstance(w, jcore.Literal) and w in by_var:
                names.add(by_var[w])
        inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
        if inner is not None:
            inner = getattr(inner, "jaxpr", inner)
            inner_map = {
                iv: by_var[ov]
                for iv, ov in zip(inner.invars, eqn.invars, strict=True)
                if not isinstance(ov, jcore.Literal) and ov in by_var
            }
            _collect(inner, inner_map, names)


@dataclasses.dataclass(frozen=True)
class QuantizeWeights:
    bits: int = 8
    name: str = dataclasses.field(default="quantize_weights", init=False)

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"quantize_weights bits={self.bits!r} is not supported; allowed: {SUPPORTED_BITS}"
                " (int4 groups and GPTQ are not implemented yet)"
            )

    def __call__(self, graph: Graph) -> Graph:
        already = [n for n, w in graph.weights.items() if isinstance(w, Int8Weight)]
        if already:
            raise ValueError(
                f"the graph's weights are already quantized ({already[0]!r} and "
                f"{len(already) - 1} more); quantize_weights cannot run twice"
            )
        targets = linear_weight_names(graph)

        def convert(weights):
            return {k: quantize_int8(v) if k in targets else v for k, v in weights.items()}

        weights = map_weights(("quantize_weights", self.bits), graph.weights, convert)

        def qlinear_rule(eqn, x, w):
            if isinstance(w, Int8Weight):
                return primitives.qlinear(x, w.q, w.scale)
            return eqn.primitive.bind(x, w, **eqn.params)

        graph = rewrite(graph, {primitives.linear_p: qlinear_rule}, weights=weights)
        return graph.replace(meta={**graph.meta, "weights": f"int{self.bits}"})


def quantize_weights(bits: int | str = 8) -> QuantizeWeights:
    """The weight quantization pass: int8 per output channel (bits=8)."""
    if isinstance(bits, str):
        if not bits.isdigit():
            raise ValueError(f"quantize_weights bits={bits!r} is not an integer")
        bits = int(bits)
    return QuantizeWeights(bits)
