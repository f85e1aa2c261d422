"""Meshes, logical-axis rules and the head layout for tensor parallelism.

    rules.py  logical axis names -> mesh axes (`DEFAULT_RULES`, overridable)
    mesh.py   the ("data", "tensor") device mesh
    heads.py  placing attention heads on `tensor` shards (replicating or padding
              KV heads when they do not divide it) and the weights that follow
    distributed.py  multi-process runs over jax.distributed (`initialize`)

The `shard` pass (passes/shard.py) uses them to annotate a graph.
"""

from __future__ import annotations

from pallax.sharding.distributed import initialize, to_host
from pallax.sharding.heads import HeadLayout, head_layout
from pallax.sharding.mesh import AXES, make_mesh
from pallax.sharding.rules import DEFAULT_RULES, LOGICAL_AXES, spec_for

__all__ = [
    "AXES", "DEFAULT_RULES", "LOGICAL_AXES", "HeadLayout", "head_layout", "initialize",
    "make_mesh", "spec_for", "to_host",
]  # fmt: skip
