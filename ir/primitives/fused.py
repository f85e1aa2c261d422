"""Fused ops: several semantic ops as one equation, made by the fusion passes
(`pallax.passes.fuse_projections`).

`linears(x, *operands, members=...)` is the projections that read one activation x
(attention's q / k / v, the MLP's gate / up), each a `linear` or `qlinear` with its own
weight operands and params, as one multiple-result op. The weights keep their names
and formats (a GGUF file's q, k and v may be packed differently), so every pass that
keys on weight names still finds them.

A fused op is defined by its members: its abstract eval, and its lowering on every
platform without a rule of its own, are the members' (`decompose`), so on tpu and cuda
each member still lowers to its Pallas kernel. A lowering that gains from the fusion
(the CPU kernels: one call, one parallel region for all members) registers a rule for
it. A rewrite whose rules cover a member's primitive sees the members one by one
(`pallax.ir.rewrite`), so passes written for `linear` / `qlinear` need nothing new.
"""

from __future__ import annotations

from jax.extend import core as jcore
from jax.extend.core import Primitive
from jax.interpreters import mlir

from pallax.ir.primitives.linear import linear_p
from pallax.ir.primitives.quantized import qlinear_p

FUSABLE = {p.name: p for p in (linear_p, qlinear_p)}

# members: one (primitive name, operand count after x, sorted params) per projection.
Member = tuple[str, int, tuple]


def parts_of(spec: tuple, operands) -> list[tuple[Primitive, list, dict]]:
    """(primitive, its operands after x, its params) per member, from a fused op's
    `members` param and its operands after x."""
    out, i = [], 0
    for name, arity, params in spec:
        out.append((FUSABLE[name], list(operands[i : i + arity]), dict(params)))
        i += arity
    if i != len(operands):
        raise TypeError(f"linears: {len(operands)} operands for members needing {i}")
    return out


def member(prim: Primitive, arity: int, params: dict) -> Member:
    if prim.name not in FUSABLE:
        raise TypeError(f"linears: {prim.name} cannot be fused (only {sorted(FUSABLE)})")
    return (prim.name, arity, tuple(sorted(params.items())))


def member_eqns(eqn) -> list:
    """A fused equation's members, as the equations they were before fusion."""
    x, *operands = eqn.invars
    parts = parts_of(eqn.params["members"], operands)
    return [
        jcore.new_jaxpr_eqn([x, *ops], [var], prim, params, eqn.effects)
        for (prim, ops, params), var in zip(parts, eqn.outvars, strict=True)
    ]


def expand(eqns) -> list:
    """`eqns` with every fused equation replaced by its members (for code that reads a
    graph op by op: weight lookups, cost reports)."""
    out = []
    for e in eqns:
        out.extend(member_eqns(e) if getattr(e.primitive, "member_primitives", None) else [e])
    return out


def decompose(x, *operands, members: tuple):
    """The members bound one by one: the reference, and the lowering wherever the fused
    op has no rule of its own."""
    return [p.bind(x, *ops, **prm) for p, ops, prm in parts_of(members, operands)]


def _abstract(x, *operands, members):
    outs = []
    for p, ops, prm in parts_of(members, operands):
        aval = p.abstract_eval(x, *ops, **prm)
        outs.append(aval[0] if isinstance(aval, tuple) else aval)
    return outs


linears_p = Primitive("linears")
linears_p.multiple_results = True
linears_p.def_impl(decompose)
linears_p.def_abstract_eval(_abstract)
mlir.register_lowering(linears_p, mlir.lower_fun(decompose, multiple_results=True))
linears_p.reference = decompose  # type: ignore[attr-defined]
linears_p.pallax_semantic = True  # type: ignore[attr-defined]
linears_p.member_primitives = tuple(FUSABLE.values())  # type: ignore[attr-defined]
