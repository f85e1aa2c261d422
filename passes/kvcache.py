"""KV-cache passes: they change the graph's cache layout and its attention ops.

`compress_kv(method="kivi", bits, group_size, residual)` replaces each layer's dense
[B, K, S, H] key and value arrays with KIVI's packed format (ir/kvquant.py) and
its `attention` op with `kivi_attention`, in every step (prefill, decode, chunk), so
prefill writes the prompt's cache in the same format and `score` reads it back.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from pallax.ir import kvkivi_h2o, kvkivi_sinks
from pallax.ir import primitives as ops
from pallax.ir.graph import CacheLayout, Graph, trace_step
from pallax.ir.kvh2o import H2OConfig, h2o_attention
from pallax.ir.kvquant import BITS, FIRST_PARTS, PARTS, KiviConfig, kivi_attention
from pallax.ir.kvsinks import SinkConfig, sink_attention
from pallax.ir.manager import DENSE_KV, FULL_KV
from pallax.ir.rewrite import eval_with_rules

GROUP_SIZES = (16, 32, 64, 128)
METHODS = ("kivi",)
LAYER_CHOICES = ("all", "global")
_KV_NAME = re.compile(r"^(.*\.)?([kv])$")


@dataclasses.dataclass
class _LayerRef:
    """Stands for one dense cache leaf (a layer's k or v) while a step is re-traced: the
    attention rule reads the layer's new cache arrays from `state` and replaces it."""

    prefix: str
    part: str
    state: dict


def _dense_layers(layout: CacheLayout) -> dict[str, tuple]:
    """Layer prefix -> (shape template, dtype) of its dense k / v pair."""
    entries = {name: (shape, dtype) for name, shape, dtype in layout.entries}
    out = {}
    for name, (shape, dtype) in entries.items():
        m = _KV_NAME.match(name)
        if m is None or len(shape) != 4:
            raise ValueError(f"cache entry {name!r} {shape} is not a dense [B, K, S, H] k/v")
        prefix = m.group(1) or ""
        other = prefix + ("v" if m.group(2) == "k" else "k")
        if other not in entries or entries[other] != (shape, dtype):
            raise ValueError(f"cache entry {name!r} has no matching {other!r}")
        out[prefix] = (shape, dtype)
    return out


@dataclasses.dataclass
class _Roped:
    """A rope op's input and parameters, kept for an attention op that rotates itself."""

    x: object
    positions: object
    theta: float
    scaling: float


def rewrite_cache(graph: Graph, layout: CacheLayout, make_rule, *, defer_rope=False) -> Graph:
    """Re-trace every step with a new cache `layout` whose attention ops `make_rule`
    rewrites.

    `make_rule(step_name, args)` returns the rule for `attention` (see rewrite.py): it
    receives `_LayerRef`s in place of the dense k / v caches and returns refs carrying
    the layer's new arrays. Cache entries of the new layout are named
    `<layer prefix><part>`, e.g. "layers.3.k.data".
    """
    old_names = sorted(name for name, _, _ in graph.cache.entries)
    steps = {}
    for name, step in graph.steps.items():

        def fn(w, c, *args, _step=step, _name=name):
            states: dict[str, dict] = {}
            for key, value in c.items():
                prefix, part = _split(key)
                states.setdefault(prefix, {})[part] = value
            refs = []
            for old in old_names:
                m = _KV_NAME.match(old)
                refs.append(_LayerRef(m.group(1) or "", m.group(2), states[m.group(1) or ""]))
            flat = jax.tree.leaves(w) + refs + list(args)
            rules = {ops.attention_p: make_rule(_name, args)}
            if defer_rope:
                rules[ops.rope_p] = lambda eqn, x, positions: _Roped(x, positions, **eqn.params)
            outs = eval_with_rules(_step.jaxpr.jaxpr, _step.jaxpr.consts, flat, rules)
            logits, old_cache = jax.tree.unflatten(_step.out_tree, outs)
            new_cache = {}
            for ref in old_cache.values():
                if not isinstance(ref, _LayerRef):
                    raise ValueError("a dense cache entry reached the output without attention")
                for part, value in ref.state.items():
                    new_cache[ref.prefix + part] = value
            return logits, new_cache

        steps[name] = trace_step(fn, step.spec, graph.weights, layout)
    return graph.replace(steps=steps, cache=layout)


def _split(key: str) -> tuple[str, str]:
    """ "layers.3.k.data" -> ("layers.3.", "k.data"); a dense "layers.3.k" -> ("layers.3.", "k")."""
    for part in (*PARTS, *FIRST_PARTS, *kvkivi_h2o.EXTRA, "h2o.pos", "h2o.score"):
        if key.endswith("." + part) or key == part:
            return key[: len(key) - len(part)], part
    m = _KV_NAME.match(key)
    if m is None:
        raise ValueError(f"cache entry {key!r} is neither a KIVI part nor a dense k / v")
    return m.group(1) or "", m.group(2)


def _valid(step_name: str, args):
    """Tokens per row of this call that are real (prefill pads rows to the bucket)."""
    b, t = args[0].shape  # tokens
    if step_name == "prefill":
        # The runtime passes logits_index = -1 for rows whose prompt ended before the chunk.
        return jnp.clip(args[2] + 1, 0, t).astype(jnp.int32)
    return jnp.full((b,), t, jnp.int32)


def _bad(name, value, allowed) -> ValueError:
    return ValueError(f"compress_kv: {name}={value!r} is not allowed; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class CompressKV:
    """KIVI: keys per channel, values per token, `bits` asymmetric, the newest
    `residual` tokens in full precision (see ir/kvquant.py).

    Beyond the paper, the first `full_first` positions (default: one group) also stay
    in full precision: the first tokens are attention sinks with keys unlike the rest,
    and quantized with them a key group's per-channel range is spent on them. Measured
    on SmolLM2 (scripts/eval_ppl.py, 64-token chunks): KIVI-2 +10.7% -> +1.1%
    perplexity, KIVI-2 with residual 32 +52.6% -> +21.3%, KIVI-4 +0.75% -> +0.26%.
    `full_first=0` is the paper's KIVI."""

    method: str = "kivi"
    bits: int = 2
    group_size: int = 32
    residual: int = 128
    scale_dtype: str = "bfloat16"
    layers: str = "all"
    full_first: int | None = None  # None: one group (keeps the attention sinks exact)
    name: str = dataclasses.field(default="compress_kv", init=False, repr=False)
    requires = removes = frozenset({DENSE_KV})
    provides = frozenset({"KIVI KV storage"})

    def __post_init__(self):
        if self.full_first is None:
            object.__setattr__(self, "full_first", self.group_size)
        if self.method not in METHODS:
            raise _bad("method", self.method, METHODS)
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise _bad("bits", self.bits, BITS)
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise _bad("group_size", self.group_size, GROUP_SIZES)
        if (
            isinstance(self.residual, bool)
            or not isinstance(self.residual, int)
            or self.residual < 0
            or self.residual % self.group_size
        ):
            raise _bad(
                "residual", self.residual, f"a multiple of group_size={self.group_size}, >= 0"
            )
        if self.scale_dtype not in ("bfloat16", "float16", "float32"):
            raise _bad("scale_dtype", self.scale_dtype, ("bfloat16", "float16", "float32"))
        if (
            isinstance(self.full_first, bool)
            or not isinstance(self.full_first, int)
            or self.full_first < 0
            or self.full_first % self.group_size
        ):
            raise _bad(
                "full_first", self.full_first, f"a multiple of group_size={self.group_size}, >= 0"
            )
        if self.layers not in LAYER_CHOICES:
            raise _bad("layers", self.layers, LAYER_CHOICES)

    @property
    def config(self) -> KiviConfig:
        return KiviConfig(
            self.bits, self.group_size, self.residual, self.scale_dtype, self.full_first
        )

    def check_head_dim(self, prefix: str, h: int) -> None:
        if h % self.group_size or (h * self.bits) % 8:
            raise ValueError(
                f"compress_kv: head dim {h} of {prefix!r} is not a multiple of "
                f"group_size={self.group_size} (values are grouped along channels)"
            )

    def __call__(self, graph: Graph) -> Graph:
        if graph.cache.kind in POLICIES:
            return _compose(graph, self)
        if graph.cache.kind != "dense":
            raise ValueError(
                f"compress_kv: the cache is already {graph.cache.kind!r}; KIVI composes "
                "with one evict_kv, once"
            )
        layers = _dense_layers(graph.cache)
        cfg = self.config
        windowed = _windowed_layers(graph)
        entries = []
        chosen = set()
        for prefix, (shape, dtype) in sorted(layers.items()):
            _, kv, _, h = shape
            self.check_head_dim(prefix, h)
            if self.layers == "global" and prefix in windowed:
                entries += [(prefix + p, s, d) for p, s, d in _dense_entries(shape, dtype)]
                continue
            chosen.add(prefix)
            for part, (s, d) in cfg.shapes(kv, h, dtype).items():
                entries.append((prefix + part, s, d))
        layout = CacheLayout(tuple(sorted(entries)), kind="kivi")

        def make_rule(step_name, args):
            valid = _valid(step_name, args)

            def rule(eqn, q, k, v, kref, vref, pos):
                prm = eqn.params
                if kref.prefix not in chosen:  # left dense (a sliding-window layer)
                    out, kc, vc = ops.attention_p.bind(
                        q, k, v, kref.state["k"], vref.state["v"], pos, **prm
                    )
                    state = {"k": kc, "v": vc}
                else:
                    out, state = kivi_attention(
                        q, k, v, pos, valid, kref.state, cfg, scale=prm["scale"],
                        sliding_window=prm["sliding_window"], softcap=prm["softcap"],
                    )  # fmt: skip
                return [out, _LayerRef(kref.prefix, "k", state), _LayerRef(vref.prefix, "v", {})]

            return rule

        return _remember(graph, self, rewrite_cache(graph, layout, make_rule))


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
    kivi, ev = (first, second) if isinstance(first, CompressKV) else (second, first)
    build = _kivi_sinks if ev.policy == "sinks" else _kivi_h2o
    return _remember(base, (kivi, ev), build(base, kivi, ev))


def _kivi_h2o(graph: Graph, kivi: CompressKV, ev: EvictKV) -> Graph:
    """Group-wise H2O over KIVI caches (ir/kvkivi_h2o.py). A sliding-window layer
    keeps a ring of its own window, as under evict_kv alone (quantized unless
    compress_kv(layers="global"))."""
    ev.check_context(graph)
    pool = kvkivi_h2o.check(kivi.config, ev.budget, ev.recent)
    windowed = _windowed_layers(graph)
    configs, entries = {}, []
    for prefix, (shape, dtype) in sorted(_dense_layers(graph.cache).items()):
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
        valid = _valid(step_name, args)

        def rule(eqn, q, k, v, kref, vref, pos):
            q_r, k_r = _rotate(q, k)
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
            return [out, _LayerRef(kref.prefix, "k", state), _LayerRef(vref.prefix, "v", {})]

        return rule

    return rewrite_cache(graph, layout, make_rule, defer_rope=True)


def _kivi_sinks(graph: Graph, kivi: CompressKV, ev: EvictKV) -> Graph:
    """Fixed-size quantized caches with sinks (ir/kvkivi_sinks.py). A sliding-window
    layer gets a quantized ring of its own window and no sinks (with
    compress_kv(layers="global"): a dense ring, as evict_kv alone gives it)."""
    windowed = _windowed_layers(graph)
    configs, entries = {}, []
    for prefix, (shape, dtype) in sorted(_dense_layers(graph.cache).items()):
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
        valid = _valid(step_name, args)

        def rule(eqn, q, k, v, kref, vref, pos):
            q_r, k_r = _rotate(q, k)
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
            return [out, _LayerRef(kref.prefix, "k", state), _LayerRef(vref.prefix, "v", {})]

        return rule

    return rewrite_cache(graph, layout, make_rule, defer_rope=True)


def _rotate(q, k):
    if not (isinstance(q, _Roped) and isinstance(k, _Roped)):
        raise ValueError("evict_kv: attention's q and k must come from rope ops")
    q_r = ops.rope(q.x, q.positions, theta=q.theta, scaling=q.scaling)
    k_r = ops.rope(k.x, k.positions, theta=k.theta, scaling=k.scaling)
    return q_r, k_r


def _dense_entries(shape, dtype):
    return [("k", shape, dtype), ("v", shape, dtype)]


def _windowed_layers(graph: Graph) -> dict[str, int]:
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


POLICIES = ("sinks", "h2o")


@dataclasses.dataclass(frozen=True)
class EvictKV:
    """A fixed-size cache per layer.

    - `policy="sinks"`: StreamingLLM, `sinks` first tokens and a rolling `window`
      (ir/kvsinks.py); generation may run past the context length.
    - `policy="h2o"`: H2O, `budget` slots holding the `recent` newest tokens and the
      heaviest hitters by accumulated attention (ir/kvh2o.py).

    Layers with their own sliding window (Gemma 3's local layers) keep a ring of
    exactly that window under either policy: they never attend further back, so for
    them a fixed cache is exact and eviction would only lose information.
    """

    policy: str = "sinks"
    sinks: int = 4
    window: int = 252
    budget: int | None = None
    recent: int | None = None
    name: str = dataclasses.field(default="evict_kv", init=False, repr=False)
    requires = removes = frozenset({FULL_KV})
    provides = frozenset({"evicted KV slots"})

    @property
    def unbounded_context(self) -> bool:
        """Sinks assign positions within the cache, so generation may run past the
        model's context length; H2O keeps true positions and may not."""
        return self.policy == "sinks"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(
                f"evict_kv: policy={self.policy!r} is not allowed; allowed: {POLICIES}"
            )
        names = ("sinks", "window") if self.policy == "sinks" else ("budget", "recent")
        for name in names:
            value = getattr(self, name)
            low = 0 if name in ("sinks", "recent") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"evict_kv({self.policy}): {name}={value!r} must be an integer >= {low}"
                )
        if self.policy == "h2o" and self.budget <= self.recent:
            raise ValueError(
                f"evict_kv(h2o): budget={self.budget} must be larger than recent="
                f"{self.recent} (the rest of the budget holds the heavy hitters)"
            )

    def check_context(self, graph: Graph) -> None:
        ctx = graph.meta.get("context_length")
        if self.policy == "h2o" and ctx is not None and self.budget > ctx:
            raise ValueError(
                f"evict_kv(h2o): budget={self.budget} is larger than the context length {ctx}"
            )

    @property
    def sink_config(self) -> SinkConfig:
        return SinkConfig(self.sinks, self.window)

    def __call__(self, graph: Graph) -> Graph:
        if graph.cache.kind == "kivi":
            return _compose(graph, self)
        if graph.cache.kind != "dense":
            raise ValueError(
                f"evict_kv: the cache is already {graph.cache.kind!r}; apply one eviction "
                "policy (evict_kv once)"
            )
        self.check_context(graph)
        layers = _dense_layers(graph.cache)
        windowed = _windowed_layers(graph)
        configs, entries = {}, []
        for prefix, (shape, dtype) in sorted(layers.items()):
            _, kv, _, h = shape
            if prefix in windowed:
                cfg = SinkConfig(0, windowed[prefix])
            elif self.policy == "sinks":
                cfg = SinkConfig(self.sinks, self.window)
            else:
                cfg = H2OConfig(self.budget, self.recent)
            configs[prefix] = cfg
            slots = cfg.slots if isinstance(cfg, SinkConfig) else cfg.budget
            for part in ("k", "v"):
                entries.append((prefix + part, ("B", kv, slots, h), dtype))
            if isinstance(cfg, H2OConfig):
                entries.append((prefix + "h2o.pos", ("B", kv, slots), "int32"))
                entries.append((prefix + "h2o.score", ("B", kv, slots), "float32"))
        layout = CacheLayout(tuple(sorted(entries)), kind=self.policy)

        def make_rule(step_name, args):
            valid = _valid(step_name, args)

            def rule(eqn, q, k, v, kref, vref, pos):
                q_r, k_r = _rotate(q, k)
                prm = eqn.params
                cfg = configs[kref.prefix]
                st = kref.state
                if isinstance(cfg, SinkConfig):
                    out, kc, vc = sink_attention(
                        q_r, k_r, v, st["k"], vref.state["v"], pos, valid, cfg,
                        theta=k.theta, scaling=k.scaling, scale=prm["scale"],
                        sliding_window=prm["sliding_window"], softcap=prm["softcap"],
                    )  # fmt: skip
                    state = {"k": kc, "v": vc}
                else:
                    h2o_state = {"k": st["k"], "v": vref.state["v"], "pos": st["h2o.pos"],
                                 "score": st["h2o.score"]}  # fmt: skip
                    out, new = h2o_attention(
                        q_r, k_r, v, pos, valid, h2o_state, cfg, scale=prm["scale"],
                        sliding_window=prm["sliding_window"], softcap=prm["softcap"],
                    )  # fmt: skip
                    state = {"k": new["k"], "v": new["v"], "h2o.pos": new["pos"],
                             "h2o.score": new["score"]}  # fmt: skip
                return [out, _LayerRef(kref.prefix, "k", state), _LayerRef(vref.prefix, "v", {})]

            return rule

        return _remember(graph, self, rewrite_cache(graph, layout, make_rule, defer_rope=True))


def check_pipeline(passes) -> None:
    """Refuse, at compile time, a KV pass sequence the passes would refuse at capture:
    one compress_kv and one evict_kv at most, next to each other when both are there,
    and the H2O budget a KIVI cache can hold."""
    kind, last = "dense", None
    for p in passes:
        if not isinstance(p, CompressKV | EvictKV):
            last = None
            continue
        if kind != "dense":
            pair = {type(p), type(last)} == {CompressKV, EvictKV}
            if last is None and "+" not in kind:
                raise ValueError(
                    f"{p.name}: compose KV passes next to each other (another pass ran "
                    "between compress_kv and evict_kv)"
                )
            if "+" in kind or not pair:
                raise ValueError(
                    f"{p.name}: the cache is already {kind!r} when it runs; KIVI composes "
                    "with one evict_kv, once each"
                )
            kivi, ev = (p, last) if isinstance(p, CompressKV) else (last, p)
            if ev.policy == "h2o":
                kvkivi_h2o.check(kivi.config, ev.budget, ev.recent)
            kind = f"kivi+{ev.policy}"
        else:
            kind = "kivi" if isinstance(p, CompressKV) else p.policy
        last = p


def evict_kv(
    policy: str = "sinks",
    *,
    sinks: int = 4,
    window: int = 252,
    budget: int | None = None,
    recent: int | None = None,
) -> EvictKV:
    """StreamingLLM sinks (`sinks` first tokens + the newest `window`) or H2O (`budget`
    slots: the `recent` newest tokens and the heaviest hitters)."""
    if policy == "h2o":
        sinks, window = 0, 0
        recent = 0 if recent is None else recent
    elif budget is not None or recent is not None:
        raise ValueError(f"evict_kv(policy={policy!r}): budget= and recent= belong to policy='h2o'")
    return EvictKV(policy, _int(sinks), _int(window), _int(budget), _int(recent))


def compress_kv(
    method: str = "kivi",
    bits: int = 2,
    group_size: int = 32,
    residual: int = 128,
    *,
    scale_dtype: str = "bfloat16",
    layers: str = "all",
    full_first: int | None = None,
) -> CompressKV:
    """The KIVI pass; numbers may come as strings from a pass string ("compress_kv:kivi:2")."""
    bits, group_size, residual = (_int(x) for x in (bits, group_size, residual))
    return CompressKV(method, bits, group_size, residual, scale_dtype, layers, _int(full_first))


def _int(x):
    return int(x) if isinstance(x, str) and x.strip().lstrip("-").isdigit() else x


__all__ = [
    "CompressKV", "EvictKV", "check_pipeline", "compress_kv", "evict_kv", "rewrite_cache",
]  # fmt: skip
