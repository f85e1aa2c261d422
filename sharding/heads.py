"""Placing attention heads on the `tensor` shards of a mesh.

Tensor parallelism gives each shard whole heads: K / t KV heads and the N / t query
heads that read them. Real small models rarely divide: SmolLM2-135M has N = 9 query
heads over K = 3 KV heads, Gemma 3 270M N = 4 over K = 1. The layout, for t shards:

- K % t == 0: nothing changes, each shard holds K / t KV heads and their queries;
- t % K == 0: each KV head is replicated r = t / K times (as vLLM and MaxText do) and
  its G = N / K query heads are dealt to its replicas, ceil(G / r) per replica,
  padded with empty query heads where r does not divide G;
- otherwise: K is padded to a multiple of t with empty KV heads (each with G empty
  query heads).

Empty heads have zero weights (wq, wk, wv rows; wo columns), so they add nothing to
the output; they cost memory: per device, wq / wo and the cache grow by N' / N and
K' / K against an even split (SmolLM2 at t = 2 or 4: K' = 4, N' = 12, 4/3 of the
attention weights and cache; at t = 8: K' = 8, N' = 24). `HeadLayout.describe` says
which rule applied.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallax.ir.lazy import LazyWeight
from pallax.ir.qformat import QuantizedWeight


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    n_heads: int
    kv_heads: int
    head_dim: int
    tensor: int
    kv_map: tuple[int, ...]  # padded KV head -> real KV head, -1: empty
    q_map: tuple[int, ...]  # padded query head -> real query head, -1: empty
    rule: str

    @property
    def padded_kv(self) -> int:
        return len(self.kv_map)

    @property
    def padded_q(self) -> int:
        return len(self.q_map)

    @property
    def identity(self) -> bool:
        return self.rule == "split"

    def describe(self) -> str:
        return (
            f"{self.rule}: {self.n_heads} query / {self.kv_heads} KV heads -> "
            f"{self.padded_q} / {self.padded_kv} over tensor={self.tensor}"
        )


def head_layout(n_heads: int, kv_heads: int, head_dim: int, tensor: int) -> HeadLayout:
    g = n_heads // kv_heads
    if kv_heads % tensor == 0:
        kv_map = list(range(kv_heads))
        q_map = list(range(n_heads))
        rule = "split"
    elif tensor % kv_heads == 0:
        r = tensor // kv_heads
        per = math.ceil(g / r)
        kv_map, q_map = [], []
        for k in range(kv_heads):
            for j in range(r):
                kv_map.append(k)
                for s in range(per):
                    gi = j * per + s
                    q_map.append(k * g + gi if gi < g else -1)
        rule = "replicate KV heads"
    else:
        kp = math.ceil(kv_heads / tensor) * tensor
        kv_map = [k if k < kv_heads else -1 for k in range(kp)]
        q_map = [k * g + s if k < kv_heads else -1 for k in range(kp) for s in range(g)]
        rule = "pad KV heads"
    return HeadLayout(n_heads, kv_heads, head_dim, tensor, tuple(kv_map), tuple(q_map), rule)


def _gather(a, index: tuple[int, ...], axis: int, unit: int):
    """Blocks of `unit` along `axis` picked by `index` (-1: a block of zeros)."""
    if isinstance(a, jax.ShapeDtypeStruct):  # an abstract weight: its new shape
        return jax.eval_shape(lambda x: _gather(x, index, axis, unit), a)
    if isinstance(a, LazyWeight):  # gathered as it is read
        return a.gather(index, axis, unit)
    a = jnp.asarray(a)
    n = a.shape[axis] // unit
    shape = a.shape[:axis] + (n, unit) + a.shape[axis + 1 :]
    blocks = a.reshape(shape)
    idx = np.asarray(index)
    picked = jnp.take(blocks, jnp.asarray(np.maximum(idx, 0)), axis=axis)
    keep = (idx >= 0).reshape((1,) * axis + (len(idx),) + (1,) * (picked.ndim - axis - 1))
    picked = jnp.where(jnp.asarray(keep), picked, jnp.zeros((), picked.dtype))
    return picked.reshape(a.shape[:axis] + (len(idx) * unit,) + a.shape[axis + 1 :])


def place_heads(name: str, w, index: tuple[int, ...], axis: int, head_dim: int):
    """A projection's heads along `axis` (0: outputs, 1: inputs) in the padded order."""
    if not isinstance(w, QuantizedWeight):
        return _gather(w, index, axis, head_dim)
    if axis == 0:  # output rows: with their scales and LLM.int8 outlier columns' weights
        fields = ("data", "scale", "offset", "outlier_w")
        leaves = {f: _gather(getattr(w, f), index, 0, head_dim)
                  for f in fields if getattr(w, f) is not None}  # fmt: skip
        return dataclasses.replace(w, **leaves)
    if w.outlier_idx is not None:
        raise ValueError(f"shard: {name} has LLM.int8 outliers; their input heads cannot be moved")
    g = w.group_size
    if w.groups == 1 and w.bits == 8:  # per output channel: the row's scale stays
        data = _gather(w.data, index, 1, head_dim)
        return dataclasses.replace(w, data=data, in_features=len(index) * head_dim,
                                   group_size=len(index) * head_dim)  # fmt: skip
    if head_dim % g or w.padded_in != w.in_features:
        raise ValueError(
            f"shard: {name} {w.shape} has quantization groups of {g} that straddle its "
            f"heads of {head_dim} inputs; use a group size dividing {head_dim}"
        )
    per_byte = 2 if w.bits == 4 else 1
    leaves = {"data": _gather(w.data, index, 1, head_dim // per_byte)}
    for f in ("scale", "offset"):
        if getattr(w, f) is not None:
            leaves[f] = _gather(getattr(w, f), index, 1, head_dim // g)
    return dataclasses.replace(w, in_features=len(index) * head_dim, **leaves)


def packed_width(data, params: dict) -> int:
    """The input width a packed weight's data holds (int4: two values a byte)."""
    return data.shape[1] * (2 if params["bits"] == 4 else 1)


def inputs_moved(data, params: dict) -> bool:
    """Whether a `qlinear`'s packed weight holds other inputs than its params say (whole
    groups of `in_features`): its inputs are heads the layout moved or padded."""
    g = params["group_size"]
    return packed_width(data, params) != -(-params["in_features"] // g) * g
