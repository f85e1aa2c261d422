"""The shard pass's rule for fused projections (`linears`, from
`pallax.passes.fuse_projections`): one shard_map around the whole fused op where every
member is split by its outputs (Megatron's column-parallel q / k / v and gate / up) or
replicated (Gemma 3's single KV head), so on CPU each shard still runs its members in
one multi-weight kernel call. A member split any other way (by its inputs, or gathered
by the `exact` layout) sends the op back to the members' own rules, one by one.

Inside, each member has the params its own rule would give it (a packed member records
the whole op's row count, `rows`, as `qlinear`'s rule does), so its outputs are those
of the unfused sharded graph, bit for bit."""

from __future__ import annotations

import math

from pallax.ir import primitives as ops
from pallax.ir.primitives.fused import linears_p, member, member_eqns, parts_of
from pallax.sharding.heads import inputs_moved
from pallax.sharding.mesh import TENSOR, batch_spec


def _fits(rules, prim, leaves, params) -> bool:
    """Whether a member runs inside the fused op's shard_map: split by outputs or
    replicated, its weight's specs one per operand, and (packed) neither gathered by the
    exact layout nor with inputs moved by the heads' padding."""
    name = rules.names.get(id(leaves[0]))
    if name is None or rules.kind(leaves[0]) not in ("columns", "replicated"):
        return False
    if len(rules.leaf_specs[name]) != len(leaves):
        return False
    if prim is ops.qlinear_p:
        return name not in rules.gathered and not inputs_moved(leaves[0], params)
    return True


def shard_linears(rules, eqn, x, *operands) -> list:
    """A fused `linears` equation under the shard pass's `rules` (`passes.shard._Rules`)."""
    parts = parts_of(eqn.params["members"], operands)
    if not all(_fits(rules, p, ops_, prm) for p, ops_, prm in parts):
        by_prim = {ops.linear_p: rules.linear, ops.qlinear_p: rules.qlinear}
        eqns = zip(member_eqns(eqn), parts, strict=True)
        return [by_prim[one.primitive](one, x, *part[1]) for one, part in eqns]
    rows = math.prod(x.shape[:-1])
    members, leaves, in_specs, out_specs = [], [], [batch_spec(x.ndim)], []
    for prim, ops_, prm in parts:
        if prim is ops.qlinear_p:  # the lowerings choose by the whole op's rows
            prm = {**prm, "rows": rows}
        members.append(member(prim, len(ops_), prm))
        leaves += ops_
        in_specs += list(rules.leaf_specs[rules.names[id(ops_[0])]])
        split = rules.kind(ops_[0]) == "columns"
        out_specs.append(batch_spec(x.ndim, last=TENSOR if split else None))
    spec = tuple(members)
    f = rules.smap(lambda x, *w: tuple(linears_p.bind(x, *w, members=spec)),
                   tuple(in_specs), tuple(out_specs))  # fmt: skip
    return list(f(x, *leaves))
