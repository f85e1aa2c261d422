"""Rewriting a graph's KV cache: re-trace every step with a new cache layout, handing
each attention op the layer's new cache arrays. The KV passes (`passes/compress_kv.py`,
`passes/evict_kv.py`) are built on it."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from pallax.ir import kvkivi_h2o
from pallax.ir import primitives as ops
from pallax.ir.graph import CacheLayout, Graph, trace_step
from pallax.ir.kvquant import FIRST_PARTS, PARTS
from pallax.ir.rewrite import eval_with_rules

KV_NAME = re.compile(r"^(.*\.)?([kv])$")


@dataclasses.dataclass
class LayerRef:
    """Stands for one dense cache leaf (a layer's k or v) while a step is re-traced: the
    attention rule reads the layer's new cache arrays from `state` and replaces it."""

    prefix: str
    part: str
    state: dict


def dense_layers(layout: CacheLayout) -> dict[str, tuple]:
    """Layer prefix -> (shape template, dtype) of its dense k / v pair."""
    entries = {name: (shape, dtype) for name, shape, dtype in layout.entries}
    out = {}
    for name, (shape, dtype) in entries.items():
        m = KV_NAME.match(name)
        if m is None or len(shape) != 4:
            raise ValueError(f"cache entry {name!r} {shape} is not a dense [B, K, S, H] k/v")
        prefix = m.group(1) or ""
        other = prefix + ("v" if m.group(2) == "k" else "k")
        if other not in entries or entries[other] != (shape, dtype):
            raise ValueError(f"cache entry {name!r} has no matching {other!r}")
        out[prefix] = (shape, dtype)
    return out


@dataclasses.dataclass
class Roped:
    """A rope op's input and parameters, kept for an attention op that rotates itself."""

    x: object
    positions: object
    theta: float
    scaling: float


def rewrite_cache(graph: Graph, layout: CacheLayout, make_rule, *, defer_rope=False) -> Graph:
    """Re-trace every step with a new cache `layout` whose attention ops `make_rule`
    rewrites.

    `make_rule(step_name, args)` returns the rule for `attention` (see rewrite.py): it
    receives `LayerRef`s in place of the dense k / v caches and returns refs carrying
    the layer's new arrays. Cache entries of the new layout are named
    `<layer prefix><part>`, e.g. "layers.3.k.data".
    """
    old_names = sorted(name for name, _, _ in graph.cache.entries)
    steps = {}
    for name, step in graph.steps.items():

        def fn(w, c, *args, _step=step, _name=name):
            states: dict[str, dict] = {}
            for key, value in c.items():
                prefix, part = split_key(key)
                states.setdefault(prefix, {})[part] = value
            refs = []
            for old in old_names:
                m = KV_NAME.match(old)
                refs.append(LayerRef(m.group(1) or "", m.group(2), states[m.group(1) or ""]))
            flat = jax.tree.leaves(w) + refs + list(args)
            rules = {ops.attention_p: make_rule(_name, args)}
            if defer_rope:
                rules[ops.rope_p] = lambda eqn, x, positions: Roped(x, positions, **eqn.params)
            outs = eval_with_rules(_step.jaxpr.jaxpr, _step.jaxpr.consts, flat, rules)
            logits, old_cache = jax.tree.unflatten(_step.out_tree, outs)
            new_cache = {}
            for ref in old_cache.values():
                if not isinstance(ref, LayerRef):
                    raise ValueError("a dense cache entry reached the output without attention")
                for part, value in ref.state.items():
                    new_cache[ref.prefix + part] = value
            return logits, new_cache

        steps[name] = trace_step(fn, step.spec, graph.weights, layout)
    return graph.replace(steps=steps, cache=layout)


def split_key(key: str) -> tuple[str, str]:
    """ "layers.3.k.data" -> ("layers.3.", "k.data"); a dense "layers.3.k" -> ("layers.3.", "k")."""
    for part in (*PARTS, *FIRST_PARTS, *kvkivi_h2o.EXTRA, "h2o.pos", "h2o.score"):
        if key.endswith("." + part) or key == part:
            return key[: len(key) - len(part)], part
    m = KV_NAME.match(key)
    if m is None:
        raise ValueError(f"cache entry {key!r} is neither a KIVI part nor a dense k / v")
    return m.group(1) or "", m.group(2)


def valid_tokens(step_name: str, args):
    """Tokens per row of this call that are real (prefill pads rows to the bucket)."""
    b, t = args[0].shape  # tokens
    if step_name == "prefill":
        # The runtime passes logits_index = -1 for rows whose prompt ended before the chunk.
        return jnp.clip(args[2] + 1, 0, t).astype(jnp.int32)
    return jnp.full((b,), t, jnp.int32)


def rotate(q, k):
    if not (isinstance(q, Roped) and isinstance(k, Roped)):
        raise ValueError("evict_kv: attention's q and k must come from rope ops")
    q_r = ops.rope(q.x, q.positions, theta=q.theta, scaling=q.scaling)
    k_r = ops.rope(k.x, k.positions, theta=k.theta, scaling=k.scaling)
    return q_r, k_r


def dense_entries(shape, dtype):
    return [("k", shape, dtype), ("v", shape, dtype)]


def windowed_layers(graph: Graph) -> dict[str, int]:
    """Layer prefixes whose attention has a sliding window (Gemma 3's local layers), in
    the order of the attention ops in the decode step matched to the cache names."""
    step = graph.steps.get("decode") or next(iter(graph.steps.values()))
    names = dict(zip(step.jaxpr.jaxpr.invars, step.input_names, strict=True))
    out = {}
    for eqn in _eqns(step.jaxpr.jaxpr):
        if eqn.primitive is ops.attention_p and eqn.params.get("sliding_window"):
            cname = names.get(eqn.invars[3], "")
            if cname.startswith("cache:"):
                out[cname[len("cache:") : -1]] = int(eqn.params["sliding_window"])
    return out


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
        if inner is not None:
            yield from _eqns(getattr(inner, "jaxpr", inner))
