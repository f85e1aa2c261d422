"""KIVI under an eviction policy: the composition `compress_kv` and `evict_kv` build when
they run next to each other, in either order, rebuilt from the dense graph before them.

These are the combination paths (KIVI x sinks, KIVI x H2O) that the orthogonal KV cache
(storage format x slot policy, issue 13) replaces; until then they live here, not in
either pass.
"""

from __future__ import annotations

from pallax.ir import kvkivi_h2o, kvkivi_sinks
from pallax.ir.graph import CacheLayout, Graph
from pallax.ir.kv_rewrite import (
    LayerRef,
    dense_layers,
    rewrite_cache,
    rotate,
    valid_tokens,
    windowed_layers,
)
from pallax.ir.kvsinks import SinkConfig, sink_attention

POLICIES = ("sinks", "h2o")


def _remember(base: Graph, kv_pass, graph: Graph) -> Graph:
    """Keep the dense graph a KV pass rewrote, so that a second KV pass right after it
    can build the composition from it (see `_compose`)."""
    n = len(base.meta.get("passes", ()))
    return graph.replace(meta={**graph.meta, "kv_base": (base, kv_pass, n)})


def _compose(graph: Graph, second) -> Graph:
    """KIVI + sinks in either order: rebuild from the dense graph with both policies."""
    base, first, n = graph.meta["kv_base"]
    if len(graph.meta.get("passes", ())) != n + 1:
        raise ValueError(
            f"{second.name}: compose KV passes next to each other (another pass ran after "
            f"{first.name}, and the composition is built from the graph before it)"
        )
    kivi, ev = (first, second) if first.name == "compress_kv" else (second, first)
    build = _kivi_sinks if ev.policy == "sinks" else _kivi_h2o
    return _remember(base, (kivi, ev), build(base, kivi, ev))


def _kivi_h2o(graph: Graph, kivi, ev) -> Graph:
    """Group-wise H2O over KIVI caches (ir/kvkivi_h2o.py). A sliding-window layer
    keeps a ring of its own window, as under evict_kv alone (quantized unless
    compress_kv(layers="global"))."""
    ev.check_context(graph)
    pool = kvkivi_h2o.check(kivi.config, ev.budget, ev.recent)
    windowed = windowed_layers(graph)
    configs, entries = {}, []
    for prefix, (shape, dtype) in sorted(dense_layers(graph.cache).items()):
        _, kv, _, h = shape
        kivi.check_head_dim(prefix, h)
        if prefix in windowed:
            sinks = SinkConfig(0, windowed[prefix])
            if kivi.layers == "global":
                configs[prefix] = ("dense-ring", sinks)
                entries += [(prefix + p, ("B", kv, sinks.slots, h), dtype) for p in ("k", "v")]
            else:
                cfg = kvkivi_sinks.config(kivi.config, sinks)
                configs[prefix] = ("kivi-ring", (cfg, sinks))
                rows = kvkivi_sinks.ring_rows(sinks.window, kivi.group_size)
                entries += [
                    (prefix + p, s, d) for p, (s, d) in cfg.shapes(kv, h, dtype, rows).items()
                ]
            continue
        c = kivi.config
        cfg = kvkivi_h2o.KiviH2OConfig(
            c.bits, c.group_size, c.residual, c.scale_dtype, c.full_first, pool
        )
        configs[prefix] = ("h2o", cfg)
        entries += [(prefix + p, s, d) for p, (s, d) in cfg.shapes(kv, h, dtype).items()]
    layout = CacheLayout(tuple(sorted(entries)), kind="kivi+h2o")

    def make_rule(step_name, args):
        valid = valid_tokens(step_name, args)

        def rule(eqn, q, k, v, kref, vref, pos):
            q_r, k_r = rotate(q, k)
            prm = eqn.params
            kw = dict(scale=prm["scale"], sliding_window=prm["sliding_window"],
                      softcap=prm["softcap"])  # fmt: skip
            kind, cfg = configs[kref.prefix]
            if kind == "dense-ring":
                out, kc, vc = sink_attention(
                    q_r, k_r, v, kref.state["k"], vref.state["v"], pos, valid, cfg,
                    theta=k.theta, scaling=k.scaling, **kw,
                )  # fmt: skip
                state = {"k": kc, "v": vc}
            elif kind == "kivi-ring":
                out, state = kvkivi_sinks.kivi_sink_attention(
                    q_r, k_r, v, pos, valid, kref.state, *cfg, theta=k.theta,
                    scaling=k.scaling, **kw,
                )  # fmt: skip
            else:
                out, state = kvkivi_h2o.kivi_h2o_attention(
                    q_r, k_r, v, pos, valid, kref.state, cfg, **kw
                )
            return [out, LayerRef(kref.prefix, "k", state), LayerRef(vref.prefix, "v", {})]

        return rule

    return rewrite_cache(graph, layout, make_rule, defer_rope=True)


def _kivi_sinks(graph: Graph, kivi, ev) -> Graph:
    """Fixed-size quantized caches with sinks (ir/kvkivi_sinks.py). A sliding-window
    layer gets a quantized ring of its own window and no sinks (with
    compress_kv(layers="global"): a dense ring, as evict_kv alone gives it)."""
    windowed = windowed_layers(graph)
    configs, entries = {}, []
    for prefix, (shape, dtype) in sorted(dense_layers(graph.cache).items()):
        _, kv, _, h = shape
        kivi.check_head_dim(prefix, h)
        sinks = SinkConfig(0, windowed[prefix]) if prefix in windowed else ev.sink_config
        if prefix in windowed and kivi.layers == "global":
            configs[prefix] = (None, sinks)
            entries += [(prefix + p, ("B", kv, sinks.slots, h), dtype) for p in ("k", "v")]
            continue
        cfg = kvkivi_sinks.config(kivi.config, sinks)
        configs[prefix] = (cfg, sinks)
        rows = kvkivi_sinks.ring_rows(sinks.window, kivi.group_size)
        entries += [(prefix + p, s, d) for p, (s, d) in cfg.shapes(kv, h, dtype, rows).items()]
    layout = CacheLayout(tuple(sorted(entries)), kind="kivi+sinks")

    def make_rule(step_name, args):
        valid = valid_tokens(step_name, args)

        def rule(eqn, q, k, v, kref, vref, pos):
            q_r, k_r = rotate(q, k)
            prm = eqn.params
            cfg, sinks = configs[kref.prefix]
            kw = dict(theta=k.theta, scaling=k.scaling, scale=prm["scale"],
                      sliding_window=prm["sliding_window"], softcap=prm["softcap"])  # fmt: skip
            if cfg is None:
                out, kc, vc = sink_attention(
                    q_r, k_r, v, kref.state["k"], vref.state["v"], pos, valid, sinks, **kw
                )
                state = {"k": kc, "v": vc}
            else:
                out, state = kvkivi_sinks.kivi_sink_attention(
                    q_r, k_r, v, pos, valid, kref.state, cfg, sinks, **kw
                )
            return [out, LayerRef(kref.prefix, "k", state), LayerRef(vref.prefix, "v", {})]

        return rule

    return rewrite_cache(graph, layout, make_rule, defer_rope=True)
