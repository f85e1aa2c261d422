"""The pass manager: a flat list of named passes, verified after each one."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import weakref
from collections.abc import Callable
from typing import Protocol

from pallax.ir.graph import Graph
from pallax.ir.printer import format_graph
from pallax.ir.verify import verify


class Pass(Protocol):
    """A graph rewrite: `Graph -> Graph`, with a `name` for printing and manifests.

    A pass may declare facts about the graph (class attributes, frozensets of strings):
    `requires` (must hold when it runs), `removes` (no longer hold after it) and
    `provides` (hold after it). `check_order` refuses a pipeline in which a pass
    requires what an earlier one removed, before anything is captured."""

    name: str

    def __call__(self, graph: Graph) -> Graph: ...


# Facts passes declare. A fresh model holds the first three (`initial_facts`).
FLOAT_WEIGHTS = "float weights"  # linears and tables hold float weights, not packed ones
DENSE_KV = "dense KV storage"  # the cache stores keys and values as plain arrays
FULL_KV = "full KV slots"  # every token keeps its cache slot (no eviction policy)
QUANTIZED_WEIGHTS = "quantized weights"


_MISSING = {
    FLOAT_WEIGHTS: " (its weights were loaded packed: keep_quantized or a quantized checkpoint)"
}


def initial_facts(*, packed_weights: bool) -> frozenset[str]:
    """What holds of a model's graph before any pass runs."""
    weights = QUANTIZED_WEIGHTS if packed_weights else FLOAT_WEIGHTS
    return frozenset({weights, DENSE_KV, FULL_KV})


def check_order(passes, facts: frozenset[str]) -> None:
    """Raise ValueError naming both passes when a pass requires a fact an earlier pass
    removed (or, naming the model, one the model never held)."""
    facts, removed_by = set(facts), {}
    for i, p in enumerate(passes):
        for fact in sorted(getattr(p, "requires", ())):
            if fact in facts:
                continue
            if fact in removed_by:
                j, q = removed_by[fact]
                fix = (
                    f"{p.name} runs once"
                    if q.name == p.name
                    else f"run {p.name} before {q.name}, or only one of them"
                )
                raise ValueError(
                    f"pass {i} ({p.name}) requires {fact}, but pass {j} ({q.name}) before it "
                    f"removed them: {fix}"
                )
            why = _MISSING.get(fact, "")
            raise ValueError(f"pass {i} ({p.name}) requires {fact}, which the model lacks{why}")
        for fact in getattr(p, "removes", ()):
            facts.discard(fact)
            removed_by[fact] = (i, p)
        facts |= set(getattr(p, "provides", ()))


def run_passes(
    graph: Graph,
    passes,
    *,
    dump: Callable[[str, Graph], None] | None = None,
) -> Graph:
    """Apply `passes` in order; verify after each; `dump(label, graph)` sees every stage."""
    if dump is not None:
        dump("input", graph)
    packed = any(hasattr(w, "bits") for w in graph.weights.values())
    check_order(passes, initial_facts(packed_weights=packed))
    applied = list(graph.meta.get("passes", ()))
    for p in passes:
        graph = p(graph)
        applied.append(describe(p))
        graph = graph.replace(meta={**graph.meta, "passes": tuple(applied)})
        verify(graph)
        if dump is not None:
            dump(f"after {describe(p)}", graph)
    return graph


def describe(p) -> str:
    if dataclasses.is_dataclass(p):
        fields = ", ".join(
            f"{f.name}={f.metadata.get('describe', repr)(getattr(p, f.name))}"
            for f in dataclasses.fields(p)
        )
        return f"{p.name}({fields})"
    return getattr(p, "name", type(p).__name__)


def printing_dump(step: str, out=print) -> Callable[[str, Graph], None]:
    def dump(label: str, graph: Graph) -> None:
        out(f"=== {label} ===")
        out(format_graph(graph, step))

    return dump


# (key, input ids) -> _Entry, weakly where a holder keeps the entry (see `holding`)
_WEIGHT_MEMO: dict = {}
_HOLDER: contextvars.ContextVar[dict | None] = contextvars.ContextVar("holder", default=None)


class _Entry:
    """A memoized transform: weak references to its inputs, and its output."""

    __slots__ = ("refs", "out", "__weakref__")

    def __init__(self, refs, out):
        self.refs, self.out = refs, out

    def alive(self) -> bool:
        return all(r() is not None for r in self.refs)


@contextlib.contextmanager
def holding(held: dict):
    """Within it, `map_weights` keeps what it computes alive through `held` (a dict the
    caller owns: a compiled model's) and only weakly in the memo: the transformed weights
    go when their last compiled model does, not when the input weights do. Without it, the
    memo holds them itself for as long as the inputs live."""
    token = _HOLDER.set(held)
    try:
        yield
    finally:
        _HOLDER.reset(token)


def _lookup(memo_key):
    item = _WEIGHT_MEMO.get(memo_key)
    entry = item() if isinstance(item, weakref.ref) else item
    return entry if entry is not None and entry.alive() else None


def _family(key):
    return key[0] if isinstance(key, tuple) and key else None


def map_weights(key, weights: dict, fn: Callable[[dict], dict], *, family=None) -> dict:
    """fn(weights), memoized on (key, the identity of the input arrays).

    Graphs are captured again for each new batch/length bucket, and the pipeline
    runs again on each capture; this keeps the weight transformation of a pass
    (cast, quantize, ...) from being recomputed for the same input weights.
    Under `holding(held)` (each compiled model's captures) the result lives as long as
    `held` does, so a model compiled under many pipelines in turn keeps only the live
    ones' weights. With `family`, only the latest key of that family is kept per input
    weights (the shard pass: a process that tries many meshes holds one placed copy, not
    one each; two live models sharded differently over the same weights re-place them on
    each new bucket capture, a cost paid for not holding a copy per mesh).
    """
    ids = tuple((k, id(v)) for k, v in sorted(weights.items()))
    memo_key = (key, ids)
    held = _HOLDER.get()
    entry = _lookup(memo_key)
    if entry is not None:
        if held is not None:
            held[memo_key] = entry
        return entry.out
    if family is not None:
        for k in [k for k in _WEIGHT_MEMO if k[1] == ids and _family(k[0]) == family]:
            del _WEIGHT_MEMO[k]
    out = fn(weights)
    try:
        refs = [weakref.ref(v) for _, v in sorted(weights.items())]
    except TypeError:
        return out
    entry = _Entry(refs, out)
    if held is None:
        _WEIGHT_MEMO[memo_key] = entry
    else:
        held[memo_key] = entry  # one entry per key: a re-placed copy replaces the last
        _WEIGHT_MEMO[memo_key] = weakref.ref(entry)
    for k in [k for k in _WEIGHT_MEMO if _lookup(k) is None]:
        del _WEIGHT_MEMO[k]
    return out
