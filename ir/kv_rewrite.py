"""Rewriting a graph's KV cache: give each layer a new storage format and slot policy
(ir/kvcache/), re-tracing every step with the new cache arrays. The KV passes
(`passes/compress_kv.py`, `passes/evict_kv.py`) are built on it, and compose in either
order: each reads the layers' current format and policy from the graph's attention ops.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallax.ir import primitives as ops
from pallax.ir.graph import CacheLayout, Graph, trace_step
from pallax.ir.kvcache import FULL, core
from pallax.ir.kvcache.dense import Dense
from pallax.ir.rewrite import eval_with_rules


@dataclasses.dataclass(frozen=True)
class Layer:
    """One attention layer's cache as the graph has it."""

    format: object
    policy: object
    kv_heads: int
    head_dim: int
    dtype: str  # the full-precision dtype of its keys and values
    sliding_window: int | None


def layers(graph: Graph) -> dict[str, Layer]:
    """Layer prefix ("layers.3.") -> its cache, read from the decode step's attention ops."""
    step = graph.steps.get("decode") or next(iter(graph.steps.values()))
    names = dict(zip(step.jaxpr.jaxpr.invars, step.input_names, strict=True))
    dtypes = {name: d for name, _, d in graph.cache.entries}
    out = {}
    for eqn in _eqns(step.jaxpr.jaxpr):
        if eqn.primitive is not ops.attention_p:
            continue
        prm = eqn.params
        fmt, policy = prm["format"], prm["policy"]
        first = core.part_names(fmt, policy)[0]
        cname = names.get(eqn.invars[5], "")
        if not cname.startswith("cache:") or not cname.endswith(first):
            raise ValueError(f"attention op reads {cname!r}, not a layer's {first!r} cache")
        prefix = cname[len("cache:") : len(cname) - len(first)]
        _, _, kv, h = eqn.invars[1].aval.shape
        dtype = next(
            (dtypes[prefix + p] for p in ("k", "k.res", "k.first") if prefix + p in dtypes),
            graph.meta.get("kv_dtype", "float32"),
        )
        out[prefix] = Layer(fmt, policy, kv, h, dtype, prm["sliding_window"])
    if not out:
        raise ValueError("the graph has no attention op over a KV cache")
    return out


@dataclasses.dataclass
class LayerRef:
    """Stands for one layer's cache arrays while a step is re-traced."""

    prefix: str
    state: dict


@dataclasses.dataclass
class Roped:
    """A rope op's input and parameters, kept for an attention op that rotates itself."""

    x: object
    positions: object
    theta: float
    scaling: float


def rewrite_kv(graph: Graph, choose, *, kind: str) -> Graph:
    """Give every layer the (format, policy) `choose(prefix, layer)` returns and re-trace
    every step with the new cache arrays (named `<prefix><part>`, e.g. "layers.3.k.data")."""
    old = layers(graph)
    new = {}
    entries, key_of = [], {}
    for prefix, layer in sorted(old.items()):
        fmt, policy = choose(prefix, layer)
        fmt.check(layer.head_dim, prefix)
        policy.check(fmt)
        new[prefix] = (fmt, policy)
        for part, (shape, dtype) in core.layer_parts(
            fmt, policy, layer.kv_heads, layer.head_dim, layer.dtype
        ).items():
            entries.append((prefix + part, shape, dtype))
            key_of[prefix + part] = (prefix, part)
    old_keys = {}
    for prefix, layer in old.items():
        for part in core.part_names(layer.format, layer.policy):
            old_keys[prefix + part] = prefix
    layout = CacheLayout(tuple(sorted(entries)), kind=kind)
    old_names = sorted(name for name, _, _ in graph.cache.entries)
    steps = {}
    for name, step in graph.steps.items():

        def fn(w, c, *args, _step=step, _name=name):
            states: dict[str, dict] = {}
            for key, value in c.items():
                prefix, part = key_of[key]
                states.setdefault(prefix, {})[part] = value
            refs = [LayerRef(old_keys[k], states[old_keys[k]]) for k in old_names]
            valid = valid_tokens(_name, args)

            def attention(eqn, q, k, v, pos, _valid, *cache_refs):
                prm = eqn.params
                prefix = cache_refs[0].prefix
                fmt, policy = new[prefix]
                rope = None
                if isinstance(q, Roped) and isinstance(k, Roped):
                    rope = (k.theta, k.scaling)
                    q = ops.rope(q.x, q.positions, theta=q.theta, scaling=q.scaling)
                    k = ops.rope(k.x, k.positions, theta=k.theta, scaling=k.scaling)
                if policy.sinks and rope is None:
                    raise ValueError(f"{policy}: the attention's q and k must come from rope ops")
                names = core.part_names(fmt, policy)
                state = states[prefix]
                if isinstance(fmt, Dense) and policy == FULL:
                    n_valid = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
                else:
                    n_valid = valid
                outs = ops.attention_p.bind(
                    q, k, v, pos, n_valid, *(state[p] for p in names),
                    **{**prm, "format": fmt, "policy": policy,
                       "rope": None if rope is None else (float(rope[0]), float(rope[1]))},
                )  # fmt: skip
                new_state = dict(zip(names, outs[1:], strict=True))
                return [outs[0]] + [LayerRef(prefix, new_state if i == 0 else {})
                                    for i in range(len(cache_refs))]  # fmt: skip

            rules = {
                ops.attention_p: attention,
                ops.rope_p: lambda eqn, x, positions: Roped(x, positions, **eqn.params),
            }
            flat = jax.tree.leaves(w) + refs + list(args)
            outs = eval_with_rules(_step.jaxpr.jaxpr, _step.jaxpr.consts, flat, rules)
            logits, old_cache = jax.tree.unflatten(_step.out_tree, outs)
            new_cache = {}
            for ref in old_cache.values():
                if not isinstance(ref, LayerRef):
                    raise ValueError("a cache entry reached the output without attention")
                for part, value in ref.state.items():
                    new_cache[ref.prefix + part] = value
            return logits, new_cache

        steps[name] = trace_step(fn, step.spec, graph.weights, layout)
    dtype = next(iter(old.values())).dtype
    return graph.replace(steps=steps, cache=layout, meta={**graph.meta, "kv_dtype": dtype})


def valid_tokens(step_name: str, args):
    """Tokens per row of this call that are real (prefill pads rows to the bucket)."""
    b, t = args[0].shape  # tokens
    if step_name == "prefill":
        # The runtime passes logits_index = -1 for rows whose prompt ended before the chunk.
        return jnp.clip(args[2] + 1, 0, t).astype(jnp.int32)
    return jnp.full((b,), t, jnp.int32)


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
        if inner is not None:
            yield from _eqns(getattr(inner, "jaxpr", inner))
