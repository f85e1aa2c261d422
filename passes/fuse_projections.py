"""fuse_projections: the projections that read one activation become one op.

Attention's q / k / v and the MLP's gate / up each read the same normed activation. This
pass groups every `linear` / `qlinear` equation by the activation it reads and replaces
each group of two or more with one `linears` equation (`pallax.ir.primitives.fused`),
placed where the group's first member was. Weights keep their names and formats: a
member may be float, int8, int4 or a GGUF block format, each its own, and passes that
run afterwards see the members one by one (`pallax.ir.rewrite`).

What it buys is in the lowering. On CPU, packed members run as one call of the C++
kernel (`pallax.cpu_kernels`): one parallel region for all of them, where each
projection was its own fork and join. Elsewhere a fused op lowers to its members'
kernels, so the pass changes nothing there. Each member computes exactly what it did
alone: the fused graph's outputs are bit-equal to the unfused graph's.

On by default: `pallax.compile` runs it after the other passes (before `shard`); name it
with a leading minus ("-fuse_projections") to leave it out.

This is a graph-to-graph rewrite of the jaxprs, not a re-trace: fusing moves equations,
which a rule that sees one equation at a time cannot do.
"""

from __future__ import annotations

import dataclasses

from jax.extend import core as jcore

from pallax.ir import primitives
from pallax.ir.graph import Graph
from pallax.ir.primitives.fused import linears_p, member

_INNER = ("pjit", "jit", "closed_call", "core_call")


@dataclasses.dataclass(frozen=True)
class FuseProjections:
    name: str = dataclasses.field(default="fuse_projections", init=False)
    fusion = True  # a fusion pass: graph-only, on by default (pallax.compile)

    def __call__(self, graph: Graph) -> Graph:
        steps = {}
        for name, step in graph.steps.items():
            closed = step.jaxpr
            steps[name] = dataclasses.replace(
                step, jaxpr=jcore.ClosedJaxpr(fuse_jaxpr(closed.jaxpr), closed.consts)
            )
        return graph.replace(steps=steps)


def fuse_projections() -> FuseProjections:
    """The pass that fuses sibling projections (q / k / v, gate / up) into one op."""
    return FuseProjections()


def _fusable(eqn) -> bool:
    return eqn.primitive in (primitives.linear_p, primitives.qlinear_p) and not isinstance(
        eqn.invars[0], jcore.Literal
    )


def fuse_jaxpr(jaxpr: jcore.Jaxpr) -> jcore.Jaxpr:
    """`jaxpr` with each group of projections of one activation as one `linears`."""
    eqns = [_fuse_inner(e) for e in jaxpr.eqns]
    defined_at: dict = {v: -1 for v in (*jaxpr.invars, *jaxpr.constvars)}
    for i, e in enumerate(eqns):
        for v in e.outvars:
            defined_at[v] = i
    groups: dict = {}
    for i, e in enumerate(eqns):
        if _fusable(e):
            groups.setdefault(e.invars[0], []).append(i)
    fused_at, dropped = {}, set()
    for idx in groups.values():
        first = idx[0]
        # a member can move up to the first only if its weights exist there already
        ready = [
            i
            for i in idx
            if all(
                isinstance(v, jcore.Literal) or defined_at.get(v, len(eqns)) < first
                for v in eqns[i].invars[1:]
            )
        ]
        if len(ready) < 2:
            continue
        fused_at[ready[0]] = _fused_eqn([eqns[i] for i in ready])
        dropped.update(ready[1:])
    if not fused_at:
        same = all(a is b for a, b in zip(eqns, jaxpr.eqns, strict=True))
        return jaxpr if same else jaxpr.replace(eqns=eqns)
    out = []
    for i, e in enumerate(eqns):
        if i in fused_at:
            out.append(fused_at[i])
        elif i not in dropped:
            out.append(e)
    return jaxpr.replace(eqns=out)


def _fused_eqn(group) -> jcore.JaxprEqn:
    x = group[0].invars[0]
    spec = tuple(member(e.primitive, len(e.invars) - 1, e.params) for e in group)
    invars = [x] + [v for e in group for v in e.invars[1:]]
    outvars = [e.outvars[0] for e in group]
    return jcore.new_jaxpr_eqn(invars, outvars, linears_p, {"members": spec}, jcore.no_effects)


def _fuse_inner(eqn):
    """Fusion inside an inlined call's jaxpr (a jitted helper the model calls)."""
    if eqn.primitive.name not in _INNER:
        return eqn
    key = "jaxpr" if "jaxpr" in eqn.params else "call_jaxpr"
    inner = eqn.params.get(key)
    if isinstance(inner, jcore.ClosedJaxpr):
        new = fuse_jaxpr(inner.jaxpr)
        if new is inner.jaxpr:
            return eqn
        return eqn.replace(params={**eqn.params, key: jcore.ClosedJaxpr(new, inner.consts)})
    if isinstance(inner, jcore.Jaxpr):
        new = fuse_jaxpr(inner)
        return eqn if new is inner else eqn.replace(params={**eqn.params, key: new})
    return eqn
