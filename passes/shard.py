"""shard: tensor and data parallelism as a pass. Annotates the graph for a
("data", "tensor") device mesh and lowers every semantic op per shard.

- Weights get a PartitionSpec from their logical axes (model/llama.py
  `logical_axes`) and the rules (sharding/rules.py): Megatron's layout, q/k/v and
  gate/up split by output columns, o and down by input rows, the embedding and the LM
  head by vocabulary. The KV cache is split by batch ("data") and KV heads ("tensor").
- Heads that do not divide `tensor` are replicated or padded (sharding/heads.py); the
  weights are re-laid out once (memoized) and the graph's head reshapes follow.
- Each semantic op runs inside `shard_map` with local shapes, so the CPU and Pallas
  kernels run per shard and never see a gathered tensor: a row-parallel projection
  ends with one `psum` over "tensor" (2 per layer), the vocabulary-parallel
  embedding with one; the LM head's logits stay split by vocabulary.
- The batch is split over "data": every step's batch must be a multiple of `data`
  (the runtime rounds its batch buckets up).

`shard` must be the last pass: the ops it wraps are the ones the other passes rewrite.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from pallax.ir import primitives as ops
from pallax.ir.graph import Graph
from pallax.ir.lazy import LazyWeight
from pallax.ir.manager import map_weights
from pallax.ir.primitives.fused import linears_p
from pallax.ir.qformat import QuantizedWeight
from pallax.ir.rewrite import rewrite
from pallax.sharding.fused import shard_linears
from pallax.sharding.heads import head_layout, inputs_moved, packed_width, place_heads
from pallax.sharding.mesh import AXES, make_mesh
from pallax.sharding.mesh import batch_spec as _batch
from pallax.sharding.rules import check_rules, spec_for

P = PartitionSpec
T, D = "tensor", "data"
SHARDED = "sharded for a mesh"


@dataclasses.dataclass(frozen=True)
class Shard:
    """Tensor (`tensor`) x data (`data`) parallelism over `devices` (default: the first
    tensor * data devices); `rules` override the logical-axis rules. `abstract=True`
    plans for a mesh of that shape without devices (jax.sharding.AbstractMesh): the
    weights become abstract, so the model compiles, reports its memory per device and
    lowers for tpu / cuda (`CompiledModel.lower`) but cannot run."""

    tensor: int = 1
    data: int = 1
    devices: tuple | None = None
    rules: tuple = ()
    abstract: bool = False
    exact: bool = True
    name: str = dataclasses.field(default="shard", init=False, repr=False)
    provides = frozenset({SHARDED})

    def __post_init__(self):
        for name in ("tensor", "data"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"shard: {name}={value!r} must be a positive integer")
        object.__setattr__(self, "rules", tuple(tuple(r) for r in self.rules))
        check_rules(self.rules)
        for name in ("abstract", "exact"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"shard: {name}={getattr(self, name)!r} must be True or False")
        if self.abstract and self.devices is not None:
            raise ValueError("shard: abstract=True plans without devices; devices= was given")
        if self.devices is not None:
            object.__setattr__(self, "devices", tuple(self.devices))
        self.mesh  # noqa: B018 - refuses a device count that cannot hold the mesh, now

    @property
    def mesh(self):
        if self.abstract:
            return AbstractMesh((self.data, self.tensor), AXES)
        return make_mesh(self.tensor, self.data, self.devices)

    def __call__(self, graph: Graph) -> Graph:
        mesh = self.mesh
        rules = check_rules(self.rules)
        axes = graph.meta.get("logical_axes")
        if axes is None:
            raise ValueError("shard: the graph has no logical axes (an architecture declares them)")
        for step in graph.steps.values():
            if step.spec.batch % self.data:
                raise ValueError(
                    f"shard: step {step.spec.name!r} has batch {step.spec.batch}, not a "
                    f"multiple of data={self.data}"
                )
        n, kv, h = graph.meta["heads"]
        if (rules["q_heads"] == T) != (rules["kv_heads"] == T):
            raise ValueError("shard: rules must split q_heads and kv_heads together, or neither")
        heads_split = rules["q_heads"] == T and self.tensor > 1
        layout = head_layout(n, kv, h, self.tensor if heads_split else 1)
        where = "abstract" if self.abstract else tuple(d.id for d in mesh.devices.flat)
        key = ("shard", self.tensor, self.data, self.rules, where, self.exact)
        weights, specs, gathered = map_weights(
            key, graph.weights,
            lambda w: _place(w, axes, rules, layout, mesh, self.tensor, self.exact),
            family="shard",
        )  # fmt: skip
        per_leaf = {}
        for name, w in weights.items():
            tree = leaf_specs(w, specs[name])
            per_leaf[name] = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, P))
        cache_spec = P(D, T) if heads_split else P(D)
        cache = dataclasses.replace(
            graph.cache,
            entries=tuple((name, (shape[0], layout.padded_kv, *shape[2:]), dt)
                          for name, shape, dt in graph.cache.entries),
        ) if not layout.identity else graph.cache  # fmt: skip
        names: dict[int, str] = {}

        def remember(w):
            names.clear()
            for name, value in w.items():
                for leaf in jax.tree.leaves(value):
                    names[id(leaf)] = name

        lowering = _Rules(mesh, specs, per_leaf, names, heads_split, cache_spec, gathered)
        out = rewrite(graph, lowering.rules(not layout.identity), weights=weights, cache=cache,
                      on_weights=remember)  # fmt: skip
        return out.replace(meta={
            **out.meta, "mesh": mesh, "shard": (self.tensor, self.data),
            "weight_specs": specs, "cache_spec": cache_spec, "head_layout": layout.describe(),
        })  # fmt: skip


def _place(weights, axes, rules, layout, mesh, tensor, exact):
    """Heads in the padded layout, each weight's PartitionSpec checked against its shape
    and quantization groups, and the arrays put on the mesh. -> (weights, specs,
    gathered: {name: the real input columns of its gathered input, or None})."""
    out, specs, gathered = {}, {}, {}
    maps = {"q_heads": layout.q_map, "kv_heads": layout.kv_map}
    for name, w in sorted(weights.items()):
        ax = axes.get(name)
        if ax is None:
            raise ValueError(f"shard: weight {name!r} has no logical axes")
        spec = spec_for(ax, rules)
        if exact and _splits_inputs_only(w, spec, tensor):
            # split by output rows instead, over the gathered input: see _Rules.qlinear
            spec = P(T)
            cols = None
            if not layout.identity and ax[1] in maps:
                cols = _real_columns(maps[ax[1]], layout.head_dim)
            gathered[name] = cols
        elif not layout.identity:
            for axis_name, index in maps.items():
                if axis_name in ax:
                    w = place_heads(name, w, index, ax.index(axis_name), layout.head_dim)
        _check_divides(name, w, spec, mesh)
        specs[name] = spec
        out[name] = _put(w, spec, mesh)
    return out, specs, gathered


def _splits_inputs_only(w, spec, tensor) -> bool:
    """A packed weight that Megatron splits by input rows (o, down) and whose outputs
    divide `tensor`: `exact` splits it by outputs instead."""
    return (isinstance(w, QuantizedWeight) and tensor > 1 and tuple(spec)[:2] == (None, T)
            and w.shape[0] % tensor == 0)  # fmt: skip


def _real_columns(index, head_dim: int) -> np.ndarray:
    """The columns of a padded head layout (`index`: padded head -> real head, -1 empty)
    that hold the real heads, in the real heads' order."""
    where = {h: p for p, h in enumerate(index) if h >= 0}
    return np.concatenate([np.arange(head_dim) + where[h] * head_dim for h in sorted(where)])


def check_pipeline(passes) -> None:
    """Refuse, at compile time: a shard that is not the last pass, and LLM.int8 outliers
    under a final shard(exact=False), before the calibration that finds them (Megatron's
    layout splits the inputs of o and down, where outlier columns fall; outliers a
    checkpoint already holds are refused as the weights are placed, in _check_divides)."""
    for i, p in enumerate(passes[:-1]):
        if p.name == "shard":
            raise ValueError(
                f"pass {i} (shard) must be the last pass; {passes[i + 1].name} runs after it"
            )
    last = passes[-1] if passes else None
    if not isinstance(last, Shard) or last.exact or last.tensor == 1:
        return
    rules = check_rules(last.rules)
    if T not in (rules["q_heads"], rules["mlp"]):
        return
    for i, p in enumerate(passes[:-1]):
        if getattr(p, "outlier_threshold", None) is not None:
            raise ValueError(
                f"shard: exact=False splits the inputs of o and down, and pass {i} ({p.name}, "
                f"outlier_threshold={p.outlier_threshold:g}) would keep LLM.int8 outliers "
                "along its split inputs; use exact=True (the default), which gathers them"
            )


def _check_divides(name, w, spec, mesh):
    shape = w.shape
    for dim, axis in enumerate(spec):
        if axis is None:
            continue
        size = mesh.shape[axis]
        if shape[dim] % size:
            raise ValueError(
                f"shard: {name} {tuple(shape)} dimension {dim} ({shape[dim]}) does not split "
                f"over {axis}={size}"
            )
        if isinstance(w, QuantizedWeight) and dim == 1:
            if w.outlier_idx is not None:
                raise ValueError(f"shard: {name} has LLM.int8 outliers along its split inputs")
            if w.groups == 1:  # per output channel: each shard keeps the row's scale
                continue
            if w.padded_in != w.in_features or w.groups % size:
                raise ValueError(
                    f"shard: {name} {tuple(shape)} with group_size={w.group_size} would have a "
                    f"quantization group straddle its {size} shards of {shape[1] // size} "
                    "inputs; choose a group size dividing that"
                )


def leaf_specs(w, spec):
    """The PartitionSpec of each array of a weight (a packed weight's per-channel scale
    is not split by inputs)."""
    if not isinstance(w, QuantizedWeight):
        return spec
    row = tuple(spec)[:1]
    full = PartitionSpec(*tuple(spec))
    per_row = P(*row) if w.groups == 1 else full  # a per-channel scale is not split by inputs
    return dataclasses.replace(
        w, data=full, scale=per_row, offset=None if w.offset is None else per_row,
        outlier_idx=None if w.outlier_idx is None else P(),
        outlier_w=None if w.outlier_w is None else P(*row),
    )  # fmt: skip


def _put(w, spec, mesh):
    tree = leaf_specs(w, spec)
    return jax.tree.map(lambda a, s: place(a, NamedSharding(mesh, s)), w, tree,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))  # fmt: skip


def place(a, sharding):
    """`a` on the devices of `sharding`, each device given only its slice; across
    processes each process fills only its own devices, from its own copy of `a`. An
    abstract weight (or mesh) stays abstract, with the sharding attached."""
    if isinstance(a, jax.ShapeDtypeStruct) or isinstance(sharding.mesh, AbstractMesh):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # planned, not placed
    if isinstance(a, LazyWeight):  # each device's slice read from the file
        return jax.make_array_from_callback(a.shape, sharding, a.read)
    if isinstance(a, jax.Array) and a.sharding == sharding:
        return a
    if sharding.is_fully_addressable:
        return jax.device_put(a, sharding)
    host = a if isinstance(a, np.ndarray) else np.asarray(jax.device_get(a))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


class _Rules:
    """The per-op shard_map lowerings of one shard pass."""

    def __init__(self, mesh, specs, leaf_specs, names, heads_split, cache_spec, gathered):
        self.mesh, self.specs, self.leaf_specs, self.names = mesh, specs, leaf_specs, names
        self.heads_split, self.cache_spec, self.gathered = heads_split, cache_spec, gathered

    def smap(self, f, in_specs, out_specs):
        return jax.shard_map(f, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)  # fmt: skip

    def kind(self, w) -> str:
        spec = tuple(self.specs[self.names[id(w)]])
        if spec[:1] == (T,):
            return "columns"
        if spec[1:2] == (T,):
            return "rows"
        return "replicated"

    def rules(self, padded_heads: bool) -> dict:
        out = {
            ops.linear_p: self.linear,
            ops.qlinear_p: self.qlinear,
            ops.embed_p: self.embed,
            ops.qembed_p: self.embed,
            ops.lm_head_p: self.lm_head,
            ops.rms_norm_p: self.rms_norm,
            ops.attention_p: self.attention,
            linears_p: lambda eqn, x, *operands: shard_linears(self, eqn, x, *operands),
        }
        if padded_heads:
            out[lax.reshape_p] = _reshape_heads
        return out

    def _project(self, eqn, x, leaves, params_for_rows):
        kind = self.kind(leaves[0])
        w_specs = tuple(self.leaf_specs[self.names[id(leaves[0])]])
        if len(w_specs) != len(leaves):
            raise ValueError(f"shard: {eqn.primitive.name} reads {len(leaves)} weight arrays")
        if kind == "columns":
            f = self.smap(lambda x, *w: eqn.primitive.bind(x, *w, **eqn.params),
                          (_batch(x.ndim), *w_specs), _batch(x.ndim, last=T))  # fmt: skip
        elif kind == "rows":
            params = params_for_rows(eqn.params)

            def f_rows(x, *w):
                return lax.psum(eqn.primitive.bind(x, *w, **params), T)

            f = self.smap(f_rows, (_batch(x.ndim, last=T), *w_specs), _batch(x.ndim))
        else:
            f = self.smap(lambda x, *w: eqn.primitive.bind(x, *w, **eqn.params),
                          (_batch(x.ndim), *w_specs), _batch(x.ndim))  # fmt: skip
        return f(x, *leaves)

    def linear(self, eqn, x, w):
        return self._project(eqn, x, [w], lambda prm: prm)

    def qlinear(self, eqn, x, *leaves):
        t = self.mesh.shape[T]
        # the lowerings pick their method by the whole op's rows, not a data shard's
        eqn = eqn.replace(params={**eqn.params, "rows": math.prod(x.shape[:-1])})
        name = self.names[id(leaves[0])]
        if name in self.gathered:
            return self._gathered_rows(eqn, x, list(leaves), self.gathered[name])
        prm = eqn.params
        if inputs_moved(leaves[0], prm):
            # heads moved (sharding/heads.py): the weight's inputs changed with them
            width = packed_width(leaves[0], prm)
            per_channel = prm["group_size"] >= prm["in_features"]
            group = width if per_channel else prm["group_size"]
            eqn = eqn.replace(params={**prm, "in_features": width, "group_size": group})
        if eqn.params.get("outliers") and self.kind(leaves[0]) == "rows":
            raise ValueError(
                f"shard: {name} has LLM.int8 outliers and is split by its inputs (exact=False)"
            )

        def local(prm):
            i = prm["in_features"] // t
            g = i if prm["group_size"] >= prm["in_features"] else prm["group_size"]
            return {**prm, "in_features": i, "group_size": g}  # per channel: one group

        per_channel = prm["bits"] == 8 and not prm["offset"] and leaves[1].shape[1] == 1
        if per_channel and self.kind(leaves[0]) == "rows":
            return self._row_parallel_w8a8(eqn, x, list(leaves), local(eqn.params))
        return self._project(eqn, x, list(leaves), local)

    def _gathered_rows(self, eqn, x, leaves, cols):
        """`exact`: a packed o / down projection split by output rows. Each shard gathers
        the input (split by heads or mlp columns; the real heads' columns taken out of a
        padded layout) and computes its outputs whole, with the unsharded op's row and
        block order, so its activations quantize as the unsharded op's do; the outputs
        are gathered. Two all-gathers in place of Megatron's one all-reduce."""
        w_specs = tuple(self.leaf_specs[self.names[id(leaves[0])]])

        def f(x, *w):
            x = lax.all_gather(x, T, axis=x.ndim - 1, tiled=True)
            if cols is not None:
                x = jnp.take(x, jnp.asarray(cols), axis=-1)
            y = eqn.primitive.bind(x, *w, **eqn.params)
            return lax.all_gather(y, T, axis=y.ndim - 1, tiled=True)

        f = self.smap(f, (_batch(x.ndim, last=T), *w_specs), _batch(x.ndim))
        return f(x, *leaves)

    def _row_parallel_w8a8(self, eqn, x, leaves, params):
        """Per-channel int8 quantizes each activation row (W8A8): a row split over
        shards takes its absolute maximum over all of them (one pmax), so every shard
        quantizes its slice with the scale the whole row would have."""
        w_specs = tuple(self.leaf_specs[self.names[id(leaves[0])]])

        def f(x, *w):
            absmax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
            absmax = lax.pmax(absmax, T)
            y = eqn.primitive.bind(x, *w, absmax, **{**params, "row_absmax": True})
            return lax.psum(y, T)

        f = self.smap(f, (_batch(x.ndim, last=T), *w_specs), _batch(x.ndim))
        return f(x, *leaves)

    def embed(self, eqn, ids, *leaves):
        if self.kind(leaves[0]) != "columns":  # not split by vocabulary
            specs = (_batch(ids.ndim), *[P()] * len(leaves))
            f = self.smap(lambda i, *w: eqn.primitive.bind(i, *w, **eqn.params), specs,
                          _batch(ids.ndim + 1))  # fmt: skip
            return f(ids, *leaves)

        def local(i, *w):
            rows = w[0].shape[0]
            rel = i - lax.axis_index(T) * rows
            ok = (rel >= 0) & (rel < rows)
            out = eqn.primitive.bind(jnp.where(ok, rel, 0), *w, **eqn.params)
            return lax.psum(jnp.where(ok[..., None], out, jnp.zeros((), out.dtype)), T)

        w_specs = tuple(self.leaf_specs[self.names[id(leaves[0])]])
        f = self.smap(local, (_batch(ids.ndim), *w_specs), _batch(ids.ndim + 1))
        return f(ids, *leaves)

    def lm_head(self, eqn, x, table):
        return self._project(eqn, x, [table], lambda prm: prm)

    def rms_norm(self, eqn, x, w):
        spec = _batch(x.ndim, axis=2) if (x.ndim == 4 and self.heads_split) else _batch(x.ndim)
        f = self.smap(lambda x, w: eqn.primitive.bind(x, w, **eqn.params), (spec, P()), spec)
        return f(x, w)

    def attention(self, eqn, q, k, v, pos, valid, *cache):
        heads = _batch(4, axis=2) if self.heads_split else _batch(4)
        cs = self.cache_spec
        f = self.smap(
            lambda *a: tuple(eqn.primitive.bind(*a, **eqn.params)),
            (heads, heads, heads, P(D), P(D), *[cs] * len(cache)),
            (heads, *[cs] * len(cache)),
        )
        return list(f(q, k, v, pos, valid, *cache))


def _reshape_heads(eqn, x):
    """A reshape between [..., N * H] and [..., N, H] whose head count the padded layout
    changed: the head dimension follows the input."""
    old_in = tuple(eqn.invars[0].aval.shape)
    sizes = tuple(eqn.params["new_sizes"])
    if tuple(x.shape) == old_in:
        return eqn.primitive.bind(x, **eqn.params)
    new_in = tuple(x.shape)
    diff = [i for i, (a, b) in enumerate(zip(old_in, new_in, strict=True)) if a != b]
    if len(old_in) + 1 == len(sizes) and diff == [len(old_in) - 1]:  # split the last dim
        h = sizes[-1]
        sizes = (*sizes[:-2], new_in[-1] // h, h)
    elif len(old_in) == len(sizes) + 1 and diff == [len(old_in) - 2]:  # merge the last two
        sizes = (*sizes[:-1], new_in[-2] * new_in[-1])
    else:
        raise ValueError(f"shard: cannot move heads through a reshape {old_in} -> {sizes}")
    return eqn.primitive.bind(x, **{**eqn.params, "new_sizes": sizes})


def shard(
    tensor: int = 1, data: int = 1, *, devices=None, rules=(), abstract=False, exact=True
) -> Shard:
    """Tensor x data parallelism; pass string "shard:tensor=4:data=2" (planning without
    devices: "shard:tensor=8:abstract=true"; Megatron's all-reduce for packed o / down
    projections: "shard:tensor=4:exact=false")."""
    return Shard(tensor, data, devices, rules, abstract, exact)
