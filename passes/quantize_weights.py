"""quantize_weights: int8 and int4 weights as packed `QuantizedWeight`s, `linear` -> `qlinear`.

- bits=8, group_size=None: int8 with one scale per output channel (LLM.int8()'s
  vector-wise scheme; on CPU it runs as W8A8, see primitives.qlinear_reference).
  `outlier_threshold=6.0` adds LLM.int8()'s mixed-precision decomposition: input
  features whose calibration activations exceed the threshold are multiplied in
  float32, the rest in int8. The outlier set is fixed per layer from calibration
  (LLM.int8() picks it per batch at run time; a static set keeps decode shapes
  static and costs one gather).
- bits=4, group_size=32 | 64 | 128: asymmetric int4 per group of input features,
  packed two to a byte; method="rtn" (round to nearest) or "gptq" (Frantar et al.,
  layer by layer on calibration activations, see passes/gptq.py).
- bits=8 with a group size: int8 groups (the format GGUF's Q8_0 keeps).

The weights that feed `linear` are found in the graph itself, so any architecture
is covered. Embeddings and the LM head are optional (`embeddings=`, `head=`, both
off by default). When the two share one table (tied), quantizing either quantizes
the shared table for both uses: a float copy kept for the other use would cost
more memory than the quantization saves.
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from pallax.ir import primitives, qformat
from pallax.ir.graph import Graph
from pallax.ir.manager import FLOAT_WEIGHTS, QUANTIZED_WEIGHTS, map_weights
from pallax.ir.qformat import QuantizedWeight
from pallax.ir.rewrite import rewrite
from pallax.passes import calibrate

SUPPORTED_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "gptq")
DEFAULT_GROUP_SIZE = {4: 128, 8: None}
MAX_OUTLIER_FRACTION = 0.25
DEFAULT_DAMP = 0.1  # GPTQ's dampening when there is no held-out data to choose it on


def weight_names(graph: Graph, prim) -> set[str]:
    """Names of the graph weights used as the weight operand of `prim`, in any step."""
    operand = {primitives.linear_p: 1, primitives.lm_head_p: 1, primitives.embed_p: 1}[prim]
    names: set[str] = set()
    for step in graph.steps.values():
        jaxpr = step.jaxpr.jaxpr
        by_var = dict(zip(jaxpr.invars, step.input_names, strict=True))
        _collect(jaxpr, by_var, names, prim, operand)
    return {n for n in names if n in graph.weights}


def linear_weight_names(graph: Graph) -> set[str]:
    return weight_names(graph, primitives.linear_p)


def _collect(jaxpr, by_var: dict, names: set, prim, operand: int) -> None:
    from pallax.ir.primitives.fused import expand

    for eqn in expand(jaxpr.eqns):  # the members of fused projections too
        if eqn.primitive is prim:
            w = eqn.invars[operand]
            if not isinstance(w, jcore.Literal) and w in by_var:
                names.add(by_var[w])
        inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
        if inner is not None:
            inner = getattr(inner, "jaxpr", inner)
            inner_map = {
                iv: by_var[ov]
                for iv, ov in zip(inner.invars, eqn.invars, strict=True)
                if not isinstance(ov, jcore.Literal) and ov in by_var
            }
            _collect(inner, inner_map, names, prim, operand)


def _summary(calibration) -> str:
    if calibration is None:
        return "None"
    digest = hashlib.sha256(repr(calibration).encode()).hexdigest()[:12]
    return f"<{len(calibration)} items, sha256 {digest}>"


@dataclasses.dataclass(frozen=True)
class QuantizeWeights:
    bits: int = 8
    group_size: int | None = None
    method: str = "rtn"
    outlier_threshold: float | None = None
    calibration: tuple | None = dataclasses.field(
        default=None, metadata={"describe": _summary}, compare=True
    )
    embeddings: bool = False
    head: bool = False
    table_bits: int | None = None  # the tables' width when not `bits` (8: per channel)
    damp: float | None = None  # GPTQ's dampening; None: chosen per weight on held-out data
    name: str = dataclasses.field(default="quantize_weights", init=False)
    requires = removes = frozenset({FLOAT_WEIGHTS})
    provides = frozenset({QUANTIZED_WEIGHTS})

    def __post_init__(self):
        bits, g = self.bits, self.group_size
        if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            raise ValueError(
                f"quantize_weights bits={bits!r} is not supported; allowed: {SUPPORTED_BITS}"
            )
        if g is None:
            object.__setattr__(self, "group_size", g := DEFAULT_GROUP_SIZE[bits])
        if g is not None and (isinstance(g, bool) or g not in GROUP_SIZES):
            allowed = GROUP_SIZES if bits == 4 else (None, *GROUP_SIZES)
            raise ValueError(
                f"quantize_weights group_size={g!r} is not supported; allowed: {allowed}"
            )
        if self.method not in METHODS:
            raise ValueError(f"quantize_weights method={self.method!r}; allowed: {METHODS}")
        t = self.outlier_threshold
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
                raise ValueError(f"outlier_threshold={t!r} must be a positive number or None")
            if bits != 8 or g is not None:
                raise ValueError(
                    "outlier_threshold (LLM.int8() decomposition) applies to bits=8 per output "
                    f"channel (group_size=None), not bits={bits} group_size={g}"
                )
        for flag in ("embeddings", "head"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"quantize_weights {flag}={getattr(self, flag)!r} must be a bool")
        tb = self.table_bits
        if tb is not None:
            if isinstance(tb, bool) or tb not in SUPPORTED_BITS:
                raise ValueError(
                    f"quantize_weights table_bits={tb!r} is not supported; allowed: "
                    f"{SUPPORTED_BITS} or None (the same as bits)"
                )
            if not (self.embeddings or self.head):
                raise ValueError(
                    f"quantize_weights table_bits={tb} sets the width of the embedding / head "
                    "table, which is only quantized with embeddings=True or head=True"
                )
            if tb == 4 and t is not None:
                raise ValueError(
                    "outlier_threshold needs int8 per channel; table_bits=4 tables cannot "
                    "keep outlier columns"
                )
        d = self.damp
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 100:
                raise ValueError(
                    f"quantize_weights damp={d!r} must be a number in (0, 100] (a fraction of "
                    "the Hessian's mean diagonal) or None (chosen per weight on held-out "
                    "calibration data)"
                )
            if self.method != "gptq":
                raise ValueError(f"quantize_weights damp={d!r} is GPTQ's; method={self.method!r}")
        object.__setattr__(self, "choices", {})
        if self.calibration is not None:
            if not self.needs_calibration:
                raise ValueError(
                    "calibration= is only used by method='gptq' or outlier_threshold; "
                    "this configuration would ignore it"
                )
            object.__setattr__(self, "calibration", calibrate.check_calibration(self.calibration))

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq" or self.outlier_threshold is not None

    def label(self) -> str:
        kind = f"int{self.bits}" + (f" g{self.group_size}" if self.group_size else "")
        if self.table_bits is not None and self.table_bits != self.bits:
            kind += f" (tables int{self.table_bits})"
        extra = " gptq" if self.method == "gptq" else ""
        extra += f" damp={self.damp:g}" if self.damp is not None else ""
        extra += f" outliers>{self.outlier_threshold:g}" if self.outlier_threshold else ""
        return kind + extra

    # ---------------------------------------------------------------- the pass
    def __call__(self, graph: Graph) -> Graph:
        already = [n for n, w in graph.weights.items() if isinstance(w, QuantizedWeight)]
        if already:
            raise ValueError(
                f"the graph's weights are already quantized ({already[0]!r} and "
                f"{len(already) - 1} more); quantize_weights cannot run twice"
            )
        linears = linear_weight_names(graph)
        tables = set()
        if self.embeddings or self.head:
            emb = weight_names(graph, primitives.embed_p)
            head = weight_names(graph, primitives.lm_head_p)
            tables = (emb if self.embeddings else set()) | (head if self.head else set())
            tables |= {t for t in emb | head if t in tables}
        weights = map_weights(
            ("quantize_weights", self),
            graph.weights,
            lambda ws: self._convert(graph, ws, linears, tables),
        )

        graph = rewrite(graph, packed_rules(), weights=weights)
        return graph.replace(meta={**graph.meta, "weights": self.label()})

    def _convert(self, graph: Graph, weights: dict, linears: set, tables: set) -> dict:
        out = dict(weights)
        if self.needs_calibration and any(
            isinstance(w, jax.ShapeDtypeStruct) for w in weights.values()
        ):
            raise ValueError(
                f"quantize_weights({self.label()}) calibrates on the model's outputs; the "
                "weights are abstract (a config alone): use round-to-nearest (no gptq, no "
                "outliers) to plan"
            )
        if self.needs_calibration:
            out.update(self._calibrated(graph, linears, tables))
        for name in sorted(linears | tables):
            if name not in out or not isinstance(out[name], QuantizedWeight):
                out[name] = (
                    self._table(weights[name]) if name in tables else self._rtn(weights[name])
                )
        return out

    def _table(self, w, outliers=None) -> QuantizedWeight:
        """An embedding / head table: RTN at `table_bits` (int8 per output channel, int4 in
        groups of 32) when that differs from `bits`, else like the linears. (int4 tables
        get no outliers: refused in __post_init__.)"""
        tb = self.table_bits
        if tb is None or tb == self.bits:
            return self._rtn(w, outliers)
        return self._rtn(w, outliers, bits=tb, group_size=None if tb == 8 else 32)

    def _rtn(self, w, outliers=None, *, bits=None, group_size=None) -> QuantizedWeight:
        """RTN at `bits` / `group_size` (default: the pass's), outlier columns kept apart."""
        if bits is None:
            bits, group_size = self.bits, self.group_size
        if isinstance(w, jax.ShapeDtypeStruct):  # abstract weights: shapes only
            return qformat.quantize_rtn(w, bits, group_size)
        w = np.asarray(jnp.asarray(w, jnp.float32))
        if outliers is None or len(outliers) == 0:
            return qformat.quantize_rtn(w, bits, group_size)
        regular = w.copy()
        regular[:, outliers] = 0.0
        q = qformat.quantize_rtn(regular, bits, group_size)
        return _with_outliers(q, w, outliers)

    def _calibrated(self, graph: Graph, linears: set, tables: set) -> dict:
        tokenizer = graph.meta.get("tokenizer")
        items = self.calibration or calibrate.default_calibration()
        vocab = graph.meta.get("vocab_size") or 1 << 31
        if tokenizer is None and any(isinstance(c, str) for c in items):
            raise ValueError("calibration text needs the model's tokenizer; this graph has none")
        tokens = calibrate.calibration_batch(items, tokenizer, vocab, calibrate.DEFAULT_SEQ_LEN)
        held = calibrate.held_out_rows(*tokens.shape)
        done: dict[str, QuantizedWeight] = {}
        hessian: list = [None, None]
        self.choices.clear()

        def on_linear(name, x, w):
            if name not in linears and name not in tables:
                return w
            idx = None
            if self.outlier_threshold is not None:
                peak = np.abs(x).max(axis=0)
                idx = np.flatnonzero(peak > self.outlier_threshold)
                cap = int(MAX_OUTLIER_FRACTION * x.shape[1])
                if len(idx) > cap:  # keep the largest: the decomposition stays mostly int8
                    idx = np.sort(idx[np.argsort(-peak[idx])[:cap]])
            if self.method == "gptq" and name in linears:
                from pallax.passes import gptq

                if hessian[0] is not x:  # q/k/v and gate/up share their input and Hessians
                    fit, out = (gptq.hessian_update(None, x[m], products=np.float32)[0]
                                for m in (~held, held))  # fmt: skip
                    hessian[:] = [x, [fit, out, {}]]
                fit, out, memo = hessian[1]
                wf = np.asarray(jnp.asarray(w, jnp.float32))
                if idx is not None and len(idx):
                    fit, out, memo = fit.copy(), out.copy(), {}
                    for h in (fit, out):
                        h[idx, :] = 0.0
                        h[:, idx] = 0.0
                    wr = wf.copy()
                    wr[:, idx] = 0.0
                else:
                    wr = wf
                args = {"bits": self.bits, "group_size": self.group_size}
                if self.damp is None and held.any():
                    q, self.choices[name] = gptq.gptq_select(wr, fit, out, memo=memo, **args)
                else:
                    q = gptq.gptq_quantize(wr, fit + out, damp=self.damp or DEFAULT_DAMP, **args)
                if idx is not None and len(idx):
                    q = _with_outliers(q, wf, idx)
            elif name in tables:
                q = self._table(w, idx)
            else:
                q = self._rtn(w, idx)
            done[name] = q
            if name in linears:
                return qformat.dequantize(q, jnp.asarray(w).dtype)
            return w

        calibrate.run_calibration(graph, tokens, on_linear)
        return done


def packed_rules() -> dict:
    """Rewrite rules for ops whose weight is a `QuantizedWeight`: linear -> qlinear,
    lm_head -> qlinear (+ softcap), embed -> qembed. Float weights are left as they are."""

    def linear_rule(eqn, x, w):
        if isinstance(w, QuantizedWeight):
            return primitives.qlinear(x, w)
        return eqn.primitive.bind(x, w, **eqn.params)

    def head_rule(eqn, x, table):
        if not isinstance(table, QuantizedWeight):
            return eqn.primitive.bind(x, table, **eqn.params)
        logits = primitives.qlinear(x, table, out_dtype=jnp.float32)
        cap = eqn.params["softcap"]
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def embed_rule(eqn, ids, table):
        if not isinstance(table, QuantizedWeight):
            return eqn.primitive.bind(ids, table, **eqn.params)
        dtype = eqn.outvars[0].aval.dtype
        return primitives.qembed(ids, table, scale=eqn.params["scale"], dtype=dtype)

    return {
        primitives.linear_p: linear_rule,
        primitives.lm_head_p: head_rule,
        primitives.embed_p: embed_rule,
    }


def use_packed_weights(graph: Graph, weights: dict, label: str) -> Graph:
    """A graph traced against float stand-ins, with the packed weights put in their place."""
    graph = rewrite(graph, packed_rules(), weights=weights)
    return graph.replace(meta={**graph.meta, "weights": label})


def _with_outliers(q: QuantizedWeight, w: np.ndarray, idx) -> QuantizedWeight:
    idx = np.asarray(idx, np.int32)
    return dataclasses.replace(
        q, outlier_idx=jnp.asarray(idx), outlier_w=jnp.asarray(w[:, idx], jnp.float32)
    )


def quantize_weights(
    bits: int | str = 8,
    group_size: int | None = None,
    method: str = "rtn",
    *,
    outlier_threshold: float | None = None,
    calibration=None,
    embeddings: bool = False,
    head: bool = False,
    table_bits: int | None = None,
    damp: float | None = None,
) -> QuantizeWeights:
    """The weight quantization pass (see the module docstring).

    quantize_weights(8): int8 per output channel; quantize_weights(8, outlier_threshold=6.0):
    with LLM.int8()'s outlier decomposition; quantize_weights(4, group_size=128,
    method="gptq"): int4 GPTQ. `calibration` is a list of strings or token-id arrays
    (default: a built-in text) for GPTQ and outlier detection. `table_bits=8` with
    `head=True` / `embeddings=True` keeps the table at int8 per channel under int4
    linears (as GGUF's Q4_K_M mixes widths): an int4 table is lossy. GPTQ's `damp`
    (None, the default) is chosen per weight on a held-out quarter of the calibration
    data among gptq.DAMPS, with round to nearest as a candidate (see gptq.gptq_select);
    a number fixes it for every weight.
    """
    if isinstance(bits, str):
        if not bits.isdigit():
            raise ValueError(f"quantize_weights bits={bits!r} is not an integer")
        bits = int(bits)
    return QuantizeWeights(
        bits,
        group_size,
        method,
        outlier_threshold,
        calibration,
        embeddings,
        head,
        table_bits,
        damp,
    )
