"""Logical axes and the rules that map them to mesh axes.

Architectures name every weight dimension with a logical axis (model/llama.py
`logical_axes`); a rule set maps each logical axis to a mesh axis ("data", "tensor")
or to None (replicated), the way MaxText's `logical_axis_rules` do. The default is
Megatron's layout: q/k/v and gate/up split by output columns ("q_heads", "kv_heads",
"mlp" -> tensor), o and down by input rows (the same axes on their second dimension),
the embedding and the LM head by vocabulary, the cache by batch ("data") and KV heads.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec

LOGICAL_AXES = ("batch", "vocab", "embed", "q_heads", "kv_heads", "mlp", "head_dim", "seq")
DEFAULT_RULES = (
    ("batch", "data"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", None),
    ("head_dim", None),
    ("seq", None),
)


def check_rules(rules) -> dict[str, str | None]:
    """A rule sequence ((logical, mesh axis or None), ...) as a dict, or a clear error."""
    out = dict(DEFAULT_RULES)
    for item in rules:
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise ValueError(f"shard: rule {item!r} must be (logical axis, mesh axis or None)")
        logical, mesh_axis = item
        if logical not in LOGICAL_AXES:
            raise ValueError(
                f"shard: unknown logical axis {logical!r} in a rule; known: {LOGICAL_AXES}"
            )
        if mesh_axis not in ("data", "tensor", None):
            raise ValueError(
                f"shard: rule {logical!r} -> {mesh_axis!r}: the mesh axes are 'data', "
                "'tensor' (or None to replicate)"
            )
        out[logical] = mesh_axis
    return out


def spec_for(axes: tuple[str, ...], rules: dict) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have the logical `axes` (trailing
    dimensions without a name are replicated). A mesh axis is used once per array."""
    used, spec = set(), []
    for name in axes:
        if name not in rules:
            raise ValueError(f"shard: unknown logical axis {name!r}; known: {LOGICAL_AXES}")
        mesh_axis = rules[name]
        if mesh_axis in used:
            mesh_axis = None
        used.add(mesh_axis)
        spec.append(mesh_axis)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)
