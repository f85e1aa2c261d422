"""Readable text for a graph step: one line per equation, weights named."""

from __future__ import annotations

import numpy as np
from jax.extend import core as jcore

from pallax.ir.graph import Graph, Step
from pallax.ir.primitives import SEMANTIC_PRIMITIVES

_SEMANTIC = {p.name for p in SEMANTIC_PRIMITIVES}


def _aval(a) -> str:
    return f"{np.dtype(a.dtype).name}[{','.join(str(d) for d in a.shape)}]"


def _param(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


class _Namer:
    def __init__(self):
        self.names: dict = {}
        self.count = 0

    def __call__(self, v) -> str:
        if isinstance(v, jcore.Literal):
            return str(v.val)
        if v not in self.names:
            self.names[v] = f"%{self.count}"
            self.count += 1
        return self.names[v]


def format_step(step: Step, name: str = "") -> str:
    namer = _Namer()
    jaxpr = step.jaxpr.jaxpr
    lines = [
        f"step {name or step.spec.name}: B={step.spec.batch} T={step.spec.length} "
        f"S={step.spec.cache_len}"
    ]
    for var, label in zip(jaxpr.invars, step.input_names, strict=True):
        namer.names[var] = label
    counts: dict[str, int] = {}
    _format_eqns(jaxpr, namer, lines, counts, indent="  ")
    outs = ", ".join(namer(v) for v in jaxpr.outvars[:1])
    lines.append(f"  return logits={outs}, cache ({len(jaxpr.outvars) - 1} arrays)")
    summary = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    lines.append(f"  # semantic ops: {summary}")
    return "\n".join(lines)


def _format_eqns(jaxpr, namer, lines, counts, indent):
    for eqn in jaxpr.eqns:
        prim = eqn.primitive.name
        semantic = prim in _SEMANTIC or getattr(eqn.primitive, "pallax_semantic", False)
        if semantic:
            counts[prim] = counts.get(prim, 0) + 1
        outs = ", ".join(f"{namer(v)}:{_aval(v.aval)}" for v in eqn.outvars)
        ins = " ".join(namer(v) for v in eqn.invars)
        if semantic:
            params = ", ".join(f"{k}={_param(v)}" for k, v in sorted(eqn.params.items()))
            head = f"{prim}[{params}]" if params else prim
        else:
            head = prim
        lines.append(f"{indent}{outs} = {head} {ins}")


def format_graph(graph: Graph, step: str) -> str:
    return format_step(graph.step(step), step)
