"""The passes, one module per pass (verb_object names), and pass strings: `parse_pass`,
`resolve_passes`. The compiler core they rewrite is `pallax.ir`; its main names are
re-exported here for convenience."""

from __future__ import annotations

import dataclasses

from pallax.ir.graph import CacheLayout, Graph, StepSpec, capture
from pallax.ir.manager import Pass, describe, run_passes
from pallax.ir.printer import format_graph
from pallax.ir.qformat import QuantizedWeight
from pallax.ir.rewrite import rewrite
from pallax.ir.verify import GraphError, verify
from pallax.passes.cast_dtype import CAST_DTYPES, Cast, cast
from pallax.passes.compress_kv import CompressKV, compress_kv
from pallax.passes.evict_kv import EvictKV, evict_kv
from pallax.passes.fuse_projections import FuseProjections, fuse_projections
from pallax.passes.quantize_weights import QuantizeWeights, quantize_weights
from pallax.passes.shard import Shard, shard

# Pass names accepted on the command line and as strings in `pallax.compile`:
# "name" or "name:arg" (e.g. "cast:bfloat16", "bf16").
PASS_FACTORIES = {
    "cast": cast,
    "compress_kv": compress_kv,
    "evict_kv": evict_kv,
    "fuse_projections": fuse_projections,
    "quantize_weights": quantize_weights,
    "shard": shard,
}
ALIASES = {
    "bf16": "cast:bfloat16",
    "bfloat16": "cast:bfloat16",
    "fp16": "cast:float16",
    "int8": "quantize_weights:8",
    "int8-outliers": "quantize_weights:8:outlier_threshold=6.0",
    "int4": "quantize_weights:4",
    "int4-gptq": "quantize_weights:4:method=gptq",
    "kivi2": "compress_kv:kivi:2",
    "kivi4": "compress_kv:kivi:4",
    "int8kv": "compress_kv:int8",
}


# Fusion passes: graph-only (weights untouched), on by default. `pallax.compile` runs each
# one a pipeline does not name after its other passes (before a final shard); "-name" in a
# pipeline leaves it out.
DEFAULT_FUSIONS = ("fuse_projections",)


@dataclasses.dataclass(frozen=True)
class Omit:
    """A "-name" entry in a pipeline: leave out the default fusion pass `fusion`."""

    fusion: str

    @property
    def name(self) -> str:
        return "-" + self.fusion


def with_fusions(pipeline) -> tuple:
    """`pipeline` with its `Omit`s taken out and each default fusion it does not omit run
    last (before a final shard): added there when not named, and again there when
    another pass runs after where it is named (a pass that rewrites projections sees
    the members one by one, `pallax.ir.rewrite`, and leaves them unfused; for any other
    the second run finds nothing new to fuse)."""
    omitted = {p.fusion for p in pipeline if isinstance(p, Omit)}
    rest = [p for p in pipeline if not isinstance(p, Omit)]
    named = {p.name for p in rest}
    both = sorted(omitted & named)
    if both:
        raise ValueError(f"pass {both[0]!r} is both named and left out ('-{both[0]}')")
    cut = len(rest) - 1 if rest and rest[-1].name == "shard" else len(rest)
    extra = []
    for fusion in DEFAULT_FUSIONS:
        if fusion in omitted:
            continue
        at = [i for i, p in enumerate(rest[:cut]) if p.name == fusion]
        later = rest[at[-1] + 1 : cut] if at else rest[:cut]
        if not at or any(not getattr(p, "fusion", False) for p in later):
            extra.append(parse_pass(fusion))
    return tuple(rest[:cut] + extra + rest[cut:])


def parse_pass(spec: str):
    """A pass from its textual form: "name", "name:arg" or "name:arg:key=value:...".

    e.g. "cast:bfloat16", "bf16", "quantize_weights:4:group_size=64:method=gptq".
    Values are read as int, float, None, true/false or else kept as strings.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"pass {spec!r} must be a non-empty string")
    if spec.startswith("-"):
        if spec[1:] not in DEFAULT_FUSIONS:
            raise ValueError(
                f"pass {spec!r}: only a default fusion pass can be left out with '-' "
                f"(one of {['-' + n for n in DEFAULT_FUSIONS]})"
            )
        return Omit(spec[1:])
    spec = ALIASES.get(spec, spec)
    name, *fields = spec.split(":")
    factory = PASS_FACTORIES.get(name)
    if factory is None:
        raise ValueError(
            f"unknown pass {name!r}; known passes: {sorted(PASS_FACTORIES)} "
            f"(aliases: {sorted(ALIASES)})"
        )
    args, kwargs = [], {}
    for f in fields:
        key, eq, value = f.partition("=")
        if eq:
            kwargs[key] = _value(value)
        elif kwargs:
            raise ValueError(f"pass {spec!r}: positional {f!r} after key=value arguments")
        else:
            args.append(f)
    try:
        return factory(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"pass {spec!r}: {e}") from None


def _value(text: str):
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def resolve_passes(passes) -> tuple:
    """Pass objects from a list of pass objects and/or names; validated before compiling."""
    if passes is None:
        return ()
    if isinstance(passes, str) or not isinstance(passes, (list, tuple)):
        raise ValueError(f"passes must be a list of passes or pass names, got {passes!r}")
    out = []
    for p in passes:
        if isinstance(p, str):
            out.append(parse_pass(p))
        elif isinstance(p, Omit) or (callable(p) and hasattr(p, "name")):
            out.append(p)
        else:
            raise ValueError(
                f"{p!r} is not a pass (a pass object or one of {sorted(PASS_FACTORIES)})"
            )
    return tuple(out)


__all__ = [
    "CAST_DTYPES", "CacheLayout", "Cast", "CompressKV", "Graph", "GraphError", "Pass",
    "EvictKV", "compress_kv", "evict_kv", "DEFAULT_FUSIONS", "FuseProjections",
    "Omit", "fuse_projections", "with_fusions",
    "QuantizeWeights", "QuantizedWeight", "StepSpec", "capture", "cast", "describe",
    "format_graph", "parse_pass",
    "quantize_weights", "resolve_passes", "rewrite", "run_passes", "Shard", "shard", "verify",
]  # fmt: skip
