"""compress_kv: a compressed KV storage format for every layer's cache, in every step
(prefill, decode, chunk), so prefill writes the prompt's cache in the same format and
`score` reads it back. The layers keep their slot policy (ir/kvcache/), so this pass
and `evict_kv` compose in either order.

- `method="kivi"`: KIVI k-bit, keys per channel, values per token, the newest
  `residual` tokens in full precision (ir/kvcache/kivi.py);
- `method="int8"`: int8 per token and KV head, symmetric (ir/kvcache/int8.py).
"""

from __future__ import annotations

import dataclasses

from pallax.ir.graph import Graph
from pallax.ir.kv_rewrite import rewrite_kv
from pallax.ir.kvcache import BITS, Int8, Kivi
from pallax.ir.kvcache.dense import Dense
from pallax.ir.manager import DENSE_KV

GROUP_SIZES = (16, 32, 64, 128)
METHODS = ("kivi", "int8")
LAYER_CHOICES = ("all", "global")
SCALE_DTYPES = ("bfloat16", "float16", "float32")
KIVI_ONLY = ("bits", "group_size", "residual", "scale_dtype", "full_first")


def _bad(name, value, allowed) -> ValueError:
    return ValueError(f"compress_kv: {name}={value!r} is not allowed; allowed: {allowed}")


def _multiple(value, of: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0 and not value % of


@dataclasses.dataclass(frozen=True)
class CompressKV:
    """KIVI or int8 storage for every layer's KV cache (`layers="global"`: only layers
    without their own sliding window).

    KIVI, beyond the paper: the first `full_first` positions (default: one group) also
    stay in full precision: the first tokens are attention sinks with keys unlike the
    rest, and quantized with them a key group's per-channel range is spent on them.
    Measured on SmolLM2 (scripts/eval_ppl.py, 64-token chunks): KIVI-2 +10.7% -> +1.1%
    perplexity, KIVI-2 with residual 32 +52.6% -> +21.3%, KIVI-4 +0.75% -> +0.26%.
    `full_first=0` is the paper's KIVI."""

    method: str = "kivi"
    bits: int | None = None
    group_size: int | None = None
    residual: int | None = None
    scale_dtype: str | None = None
    layers: str = "all"
    full_first: int | None = None
    name: str = dataclasses.field(default="compress_kv", init=False, repr=False)
    requires = removes = frozenset({DENSE_KV})
    provides = frozenset({"compressed KV storage"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise _bad("method", self.method, METHODS)
        if self.layers not in LAYER_CHOICES:
            raise _bad("layers", self.layers, LAYER_CHOICES)
        if self.method == "int8":
            for name in KIVI_ONLY:
                if getattr(self, name) is not None and not (name == "bits" and self.bits == 8):
                    raise ValueError(
                        f"compress_kv(method='int8'): {name}={getattr(self, name)!r} belongs to "
                        "method='kivi' (int8 is 8 bits per token, one scale per token and head)"
                    )
            return
        defaults = dict(bits=2, group_size=32, residual=128, scale_dtype="bfloat16")
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.full_first is None:
            object.__setattr__(self, "full_first", self.group_size)
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise _bad("bits", self.bits, BITS)
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise _bad("group_size", self.group_size, GROUP_SIZES)
        g = self.group_size
        if not _multiple(self.residual, g):
            raise _bad("residual", self.residual, f"a multiple of group_size={g}, >= 0")
        if self.scale_dtype not in SCALE_DTYPES:
            raise _bad("scale_dtype", self.scale_dtype, SCALE_DTYPES)
        if not _multiple(self.full_first, g):
            raise _bad("full_first", self.full_first, f"a multiple of group_size={g}, >= 0")

    @property
    def format(self):
        if self.method == "int8":
            return Int8()
        return Kivi(self.bits, self.group_size, self.residual, self.scale_dtype, self.full_first)

    def __call__(self, graph: Graph) -> Graph:
        fmt = self.format

        def choose(prefix, layer):
            if not isinstance(layer.format, Dense):
                raise ValueError(
                    f"compress_kv: the cache of {prefix!r} is already {layer.format}; "
                    "apply compress_kv once"
                )
            if self.layers == "global" and layer.sliding_window:
                return layer.format, layer.policy
            return fmt, layer.policy

        kind = graph.cache.kind
        kind = fmt.name if kind == "dense" else f"{fmt.name}+{kind}"
        return rewrite_kv(graph, choose, kind=kind)


def compress_kv(
    method: str = "kivi",
    bits: int | None = None,
    group_size: int | None = None,
    residual: int | None = None,
    *,
    scale_dtype: str | None = None,
    layers: str = "all",
    full_first: int | None = None,
) -> CompressKV:
    """The KV storage pass; numbers may come as strings from a pass string
    ("compress_kv:kivi:2", "compress_kv:int8")."""
    bits, group_size, residual = (_int(x) for x in (bits, group_size, residual))
    return CompressKV(method, bits, group_size, residual, scale_dtype, layers, _int(full_first))


def _int(x):
    return int(x) if isinstance(x, str) and x.strip().lstrip("-").isdigit() else x
