"""Readable text for a graph step: one line per equation, weights named."""

from __future__ import annotations

import numpy as np
from jax.extend import core as jcore

from pallax.ir.graph import Graph, Step
from pallax.ir.primitives import SEMANTIC_PRIMITIVES

_SEMANTIC = {p.name for p in SEMANTIC_PRIMITIVES}
_COLLECTIVES = {"psum", "pmax", "pmin", "all_gather", "all_to_all", "ppermute", "reduce_scatter",
                "psum_scatter", "psum_invariant"}  # fmt: skip


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
        elif prim in _COLLECTIVES:
            head = f"{prim}[axes={eqn.params.get('axes', eqn.params.get('axis_name'))}]"
        elif prim == "shard_map":
            specs = lambda xs: ", ".join(_spec(x) for x in xs)  # noqa: E731
            head = (f"shard_map[in=({specs(eqn.params['in_specs'])}), "
                    f"out=({specs(eqn.params['out_specs'])})]")  # fmt: skip
        else:
            head = prim
        fused = getattr(eqn.primitive, "member_primitives", None)
        if fused:  # a fused op: its members on the lines below
            head = f"{prim}[{len(eqn.outvars)} members]"
        lines.append(f"{indent}{outs} = {head} {ins}")
        if fused:
            _format_members(eqn, namer, lines, counts, indent + "    ")
        if prim == "shard_map":  # the op per shard, with local shapes
            inner = eqn.params["jaxpr"]
            inner = getattr(inner, "jaxpr", inner)
            for v, outer in zip(inner.invars, eqn.invars, strict=True):
                namer.names[v] = namer(outer)
            _format_eqns(inner, namer, lines, counts, indent + "    ")


def _format_members(eqn, namer, lines, counts, indent):
    """A fused op's members, one line each, as they would print unfused."""
    from pallax.ir.primitives.fused import member_eqns

    for one in member_eqns(eqn):
        name = one.primitive.name
        counts[name] = counts.get(name, 0) + 1
        args = ", ".join(f"{k}={_param(v)}" for k, v in sorted(one.params.items()))
        head = f"{name}[{args}]" if args else name
        ins = " ".join(namer(v) for v in one.invars)
        (out,) = one.outvars
        lines.append(f"{indent}{namer(out)}:{_aval(out.aval)} = {head} {ins}")


def _spec(x) -> str:
    axes = tuple(getattr(x, "spec", x))
    return "P(" + ", ".join("None" if a is None else repr(a) for a in axes) + ")"


def format_graph(graph: Graph, step: str) -> str:
    text = format_step(graph.step(step), step)
    specs = graph.meta.get("weight_specs")
    if specs:
        mesh = graph.meta["mesh"]
        lines = [f"  # mesh {dict(mesh.shape)}; {graph.meta.get('head_layout', '')}",
                 f"  # cache {_spec(graph.meta['cache_spec'])}; weights:"]  # fmt: skip
        lines += [f"  #   {name} {_spec(spec)}" for name, spec in sorted(specs.items())]
        text += "\n" + "\n".join(lines)
    return text
