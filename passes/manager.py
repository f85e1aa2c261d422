"""The pass manager: a flat list of named passes, verified after each one."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Protocol

from pallax.passes.ir import Graph
from pallax.passes.printer import format_graph
from pallax.passes.verify import verify


class Pass(Protocol):
    """A graph rewrite: `Graph -> Graph`, with a `name` for printing and manifests."""

    name: str

    def __call__(self, graph: Graph) -> Graph: ...


def run_passes(
    graph: Graph,
    passes,
    *,
    dump: Callable[[str, Graph], None] | None = None,
) -> Graph:
    """Apply `passes` in order; verify after each; `dump(label, graph)` sees every stage."""
    if dump is not None:
        dump("input", graph)
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


_WEIGHT_MEMO: dict = {}


def map_weights(key, weights: dict, fn: Callable[[dict], dict]) -> dict:
    """fn(weights), memoized on (key, the identity of the input arrays).

    Graphs are captured again for each new batch/length bucket, and the pipeline
    runs again on each capture; this keeps the weight transformation of a pass
    (cast, quantize, ...) from being recomputed for the same input weights.
    """
    ids = tuple((k, id(v)) for k, v in sorted(weights.items()))
    memo_key = (key, ids)
    hit = _WEIGHT_MEMO.get(memo_key)
    if hit is not None and all(ref() is not None for ref in hit[0]):
        return hit[1]
    out = fn(weights)
    try:
        refs = [weakref.ref(v) for _, v in sorted(weights.items())]
    except TypeError:
        return out
    _WEIGHT_MEMO[memo_key] = (refs, out)
    for k in [k for k, (r, _) in _WEIGHT_MEMO.items() if any(x() is None for x in r)]:
        del _WEIGHT_MEMO[k]
    return out
