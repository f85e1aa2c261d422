"""compress_kv: KIVI. Replaces each layer's dense [B, K, S, H] key and value arrays with
KIVI's packed format (ir/kvquant.py) and its `attention` op with `kivi_attention`, in
every step (prefill, decode, chunk), so prefill writes the prompt's cache in the same
format and `score` reads it back.
"""

from __future__ import annotations

import dataclasses

from pallax.ir import primitives as ops
from pallax.ir.graph import CacheLayout, Graph
from pallax.ir.kv_rewrite import (
    LayerRef,
    dense_entries,
    dense_layers,
    rewrite_cache,
    valid_tokens,
    windowed_layers,
)
from pallax.ir.kvquant import BITS, KiviConfig, kivi_attention
from pallax.ir.manager import DENSE_KV
from pallax.passes.kv_compose import POLICIES, _compose, _remember

GROUP_SIZES = (16, 32, 64, 128)


METHODS = ("kivi",)


LAYER_CHOICES = ("all", "global")


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
        layers = dense_layers(graph.cache)
        cfg = self.config
        windowed = windowed_layers(graph)
        entries = []
        chosen = set()
        for prefix, (shape, dtype) in sorted(layers.items()):
            _, kv, _, h = shape
            self.check_head_dim(prefix, h)
            if self.layers == "global" and prefix in windowed:
                entries += [(prefix + p, s, d) for p, s, d in dense_entries(shape, dtype)]
                continue
            chosen.add(prefix)
            for part, (s, d) in cfg.shapes(kv, h, dtype).items():
                entries.append((prefix + part, s, d))
        layout = CacheLayout(tuple(sorted(entries)), kind="kivi")

        def make_rule(step_name, args):
            valid = valid_tokens(step_name, args)

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
                return [out, LayerRef(kref.prefix, "k", state), LayerRef(vref.prefix, "v", {})]

            return rule

        return _remember(graph, self, rewrite_cache(graph, layout, make_rule))


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
