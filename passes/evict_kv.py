"""evict_kv: a fixed-size cache per layer, StreamingLLM sinks + window (ir/kvsinks.py) or
H2O heavy hitters (ir/kvh2o.py); and `check_pipeline`, the KV composition rules checked
at compile time.
"""

from __future__ import annotations

import dataclasses

from pallax.ir import kvkivi_h2o
from pallax.ir.graph import CacheLayout, Graph
from pallax.ir.kv_rewrite import (
    LayerRef,
    dense_layers,
    rewrite_cache,
    rotate,
    valid_tokens,
    windowed_layers,
)
from pallax.ir.kvh2o import H2OConfig, h2o_attention
from pallax.ir.kvsinks import SinkConfig, sink_attention
from pallax.ir.manager import FULL_KV
from pallax.passes.compress_kv import CompressKV, _int
from pallax.passes.kv_compose import POLICIES, _compose, _remember


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
        layers = dense_layers(graph.cache)
        windowed = windowed_layers(graph)
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
            valid = valid_tokens(step_name, args)

            def rule(eqn, q, k, v, kref, vref, pos):
                q_r, k_r = rotate(q, k)
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
                return [out, LayerRef(kref.prefix, "k", state), LayerRef(vref.prefix, "v", {})]

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
