"""evict_kv: a fixed-size cache per layer, StreamingLLM sinks + window
(ir/kvcache/sinks.py) or H2O heavy hitters (ir/kvcache/h2o.py), over whatever storage
format the layers have (compress_kv before or after); and `check_pipeline`, the KV
rules checked at compile time before anything is captured.
"""

from __future__ import annotations

import dataclasses

from pallax.ir.graph import Graph
from pallax.ir.kv_rewrite import rewrite_kv
from pallax.ir.kvcache import FULL, H2O, Sinks
from pallax.ir.manager import FULL_KV
from pallax.passes.compress_kv import CompressKV, _int

POLICIES = ("sinks", "h2o")


@dataclasses.dataclass(frozen=True)
class EvictKV:
    """A fixed-size cache per layer.

    - `policy="sinks"`: StreamingLLM, `sinks` first tokens and a rolling `window`
      (ir/kvcache/sinks.py); generation may run past the context length.
    - `policy="h2o"`: H2O, `budget` slots holding the `recent` newest tokens and the
      heaviest hitters by accumulated attention (ir/kvcache/h2o.py).

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
    def slot_policy(self):
        if self.policy == "sinks":
            return Sinks(self.sinks, self.window)
        return H2O(self.budget, self.recent)

    def __call__(self, graph: Graph) -> Graph:
        self.check_context(graph)
        policy = self.slot_policy

        def choose(prefix, layer):
            if layer.policy != FULL:
                raise ValueError(
                    f"evict_kv: the cache of {prefix!r} already has the {layer.policy} "
                    "policy; apply evict_kv once"
                )
            if layer.sliding_window:  # exact: the layer never looks further back
                return layer.format, Sinks(0, layer.sliding_window)
            return layer.format, policy

        kind = graph.cache.kind
        kind = self.policy if kind == "dense" else f"{kind}+{self.policy}"
        return rewrite_kv(graph, choose, kind=kind)


def check_pipeline(passes) -> None:
    """Refuse, at compile time, an H2O budget that a compressed format cannot hold (the
    order and repetition of KV passes is the pass manager's: `requires` / `removes`)."""
    fmt = None
    for p in passes:
        if isinstance(p, CompressKV):
            fmt = p.format
    for p in passes:
        if isinstance(p, EvictKV) and fmt is not None:
            p.slot_policy.check(fmt)


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
