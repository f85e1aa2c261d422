"""The shared rewrite helper: re-trace a graph, equation by equation, with rules.

A rule is keyed by primitive and called as `rule(eqn, *invals)`; it returns the
equation's outputs (a list when the primitive has multiple results). Equations
without a rule are re-bound as they are, so dtype changes propagate through
abstract evaluation. Higher-order `pjit` / `closed_call` equations are inlined
and rewritten recursively, so rules also apply inside them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jcore

from pallax.ir.graph import Graph, Step, abstract

Rule = Callable[..., Any]
_INLINED = ("pjit", "jit", "closed_call", "core_call")


def eval_with_rules(jaxpr: jcore.Jaxpr, consts, args, rules: dict) -> list:
    """Evaluate (or re-trace) `jaxpr` equation by equation with `rules`.

    Each value is dropped after its last use, so an eager evaluation (calibration
    runs the whole model this way on thousands of tokens) holds the live
    activations only, not every intermediate of every layer.
    """
    env: dict = {}
    last_use: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                last_use[v] = i
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal):
            last_use[v] = len(jaxpr.eqns)

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal) and last_use[v] == i:
                env.pop(v, None)  # (an equation may read a value twice)
        rule = rules.get(eqn.primitive)
        if rule is None and _covers(rules, eqn.primitive):
            outs = _eval_members(eqn, invals, rules)
        elif rule is not None:
            outs = rule(eqn, *invals)
            outs = outs if eqn.primitive.multiple_results else [outs]
        elif eqn.primitive.name in _INLINED:
            inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
            if isinstance(inner, jcore.ClosedJaxpr):
                outs = eval_with_rules(inner.jaxpr, inner.consts, invals, rules)
            else:
                outs = eval_with_rules(inner, (), invals, rules)
        else:
            for x in invals:
                if not hasattr(x, "dtype"):
                    raise TypeError(
                        f"no rewrite rule for {eqn.primitive.name!r} with a packed input {type(x)}"
                    )
            outs = eqn.primitive.bind(*invals, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, o in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _covers(rules: dict, prim) -> bool:
    return any(m in rules for m in getattr(prim, "member_primitives", ()))


def _eval_members(eqn, invals, rules) -> list:
    """A fused op's members, each by its rule (or bound as it is)."""
    from pallax.ir.primitives.fused import member_eqns

    x, *operands = invals
    outs, i = [], 0
    for one in member_eqns(eqn):
        ops = operands[i : i + len(one.invars) - 1]
        i += len(ops)
        rule = rules.get(one.primitive)
        if rule is None:
            outs.append(one.primitive.bind(x, *ops, **one.params))
        else:
            outs.append(rule(one, x, *ops))
    return outs


def _old_leaves_to_new(old, new):
    """Map the old (weights, cache) leaves to values of the new ones, by top-level name."""
    mapped = []
    for name in sorted(old):
        old_leaves = jax.tree.leaves(old[name])
        new_value = new[name]
        if len(old_leaves) == 1:
            mapped.append(new_value)
        else:
            new_leaves = jax.tree.leaves(new_value)
            if len(new_leaves) != len(old_leaves):
                raise ValueError(f"weight {name!r} changed structure twice in one rewrite")
            mapped.extend(new_leaves)
    return mapped


def rewrite(graph: Graph, rules: dict | None = None, *, weights=None, cache=None,
            on_weights=None) -> Graph:  # fmt: skip
    """Re-trace every step of `graph` with `rules`, new `weights` and/or cache layout.

    `weights` keeps the graph's weight names; a value may become a pytree (a packed
    weight), which then reaches the rules of the equations that read it.
    `on_weights(w)`, when given, sees the traced weights by name before each step is
    re-traced (a rule that must know which weight an operand is reads it from there).
    """
    rules = rules or {}
    new_weights = graph.weights if weights is None else weights
    if set(new_weights) != set(graph.weights):
        raise ValueError("a rewrite must keep the weight names")
    layout = graph.cache if cache is None else cache
    old_weights = abstract(graph.weights)
    steps = {}
    for name, step in graph.steps.items():
        spec = step.spec
        old_cache = graph.cache.shapes(spec.batch, spec.cache_len)

        def fn(w, c, *args, _step=step, _old_cache=old_cache):
            if set(c) != set(_old_cache):
                raise ValueError("cache layout names changed; use a cache rule for that")
            if on_weights is not None:
                on_weights(w)
            flat = _old_leaves_to_new(old_weights, w) + [c[k] for k in sorted(c)] + list(args)
            outs = eval_with_rules(_step.jaxpr.jaxpr, _step.jaxpr.consts, flat, rules)
            return jax.tree.unflatten(_step.out_tree, outs)

        from pallax.ir.graph import trace_step

        steps[name] = trace_step(fn, spec, new_weights, layout)
    out = graph.replace(steps=steps, weights=dict(new_weights), cache=layout)
    return out


__all__ = ["rewrite", "eval_with_rules", "Step"]
