"""What a compiled model costs: memory (`CompiledModel.memory_report`), collectives
(`collectives`), and per step the flops and bytes moved per op with a roofline time on
named targets (`cost`).

Each semantic op is costed as a fused kernel would run it: its operands and weights
read once from memory and its results written once; flops are the multiply-adds (x2)
of its matmuls and attention (a prefill chunk's queries at the end of a cache of
`cache` tokens, causally; a lookup reads only its rows). XLA's glue between them
(residual adds, the MLP activation, casts) fuses into its neighbours, so it is counted
as one write of each result, and ops that only change shapes cost nothing. An op's
roofline time on a target is max(flops / peak at the op's compute dtype, bytes /
memory bandwidth); a collective's is its bytes over the interconnect. In a sharded step
the semantic ops run inside `shard_map` with local shapes, so the report is per device.

Targets: "h100" and "tpu-v5e" from their datasheets, and "cpu", this machine measured
on first use (a float32 GEMM and a streaming read, both through XLA).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import numpy as np
from jax.extend import core as jcore

from pallax.ir import primitives as ops
from pallax.ir.printer import _COLLECTIVES


@dataclasses.dataclass(frozen=True)
class Target:
    """Peak flop/s by compute dtype, memory and interconnect bandwidth in bytes/s."""

    name: str
    flops: dict
    bandwidth: float
    interconnect: float
    source: str

    def op_time(self, op: OpCost) -> float:
        if op.kind == "collective":
            return op.bytes / self.interconnect
        peak = self.flops.get(op.dtype, self.flops["float32"])
        return max(op.flops / peak, op.bytes / self.bandwidth)


DATASHEETS = {
    "h100": Target(
        "h100",
        {"float32": 494e12, "bfloat16": 989e12, "int8": 1979e12},
        3.35e12,
        450e9,
        "NVIDIA H100 SXM datasheet, dense tensor cores (float32 as TF32, jax's default "
        "matmul precision on GPU); HBM3 3.35 TB/s; NVLink 450 GB/s each way",
    ),
    "tpu-v5e": Target(
        "tpu-v5e",
        {"float32": 197e12, "bfloat16": 197e12, "int8": 394e12},
        819e9,
        200e9,
        "Google Cloud TPU v5e: 197 TFLOP/s bf16 (float32 matmuls at jax's default "
        "precision run as one bf16 pass), 394 TOPS int8, HBM 819 GB/s, ICI 1,600 Gbit/s",
    ),
}
TARGETS = ("cpu", *DATASHEETS)


@functools.cache
def measured_cpu() -> Target:
    """This machine through XLA: a 1024^3 float32 GEMM and a 256 MiB streaming sum,
    medians of 5 (the same figure for every dtype: XLA:CPU has no faster bf16 path)."""
    import jax.numpy as jnp

    def median_time(fn, *args) -> float:
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    gemm = 2 * n**3 / median_time(jax.jit(lambda x: x @ x), a)
    big = jnp.ones((64 * 2**20,), jnp.float32)
    stream = big.nbytes / median_time(jax.jit(jnp.sum), big)
    return Target("cpu", {"float32": gemm}, stream, stream,
                  f"measured here: float32 GEMM {gemm / 1e9:.0f} GFLOP/s, streaming read "
                  f"{stream / 1e9:.1f} GB/s (also used for collectives)")  # fmt: skip


def check_target(name: str) -> None:
    if name not in TARGETS:
        raise ValueError(f"unknown cost target {name!r}; known: {list(TARGETS)}")


def target(name: str) -> Target:
    check_target(name)
    return measured_cpu() if name == "cpu" else DATASHEETS[name]


@dataclasses.dataclass(frozen=True)
class OpCost:
    kind: str  # a semantic op's name, "collective" or "other"
    name: str  # the weight it reads (or the collective), "" for none
    flops: float
    bytes: float
    dtype: str  # the compute dtype that picks the peak


@dataclasses.dataclass(frozen=True)
class CostReport:
    """Per-op costs of one step (`ops`) and their roofline times on `targets`."""

    step: str
    batch: int
    tokens: int
    cache: int
    per_device: bool
    ops: tuple[OpCost, ...]
    targets: tuple[Target, ...]

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops)

    @property
    def bytes(self) -> float:
        return sum(o.bytes for o in self.ops)

    def time(self, target_name: str) -> float:
        """Seconds for the step at the roofline of `target_name` (ops one after another)."""
        t = next((t for t in self.targets if t.name == target_name), None) or target(target_name)
        return sum(t.op_time(o) for o in self.ops)

    def by_kind(self) -> dict[str, dict]:
        """{kind: {count, flops, bytes, seconds: {target: s}}}, in the graph's order."""
        out: dict[str, dict] = {}
        for o in self.ops:
            zero = {t.name: 0.0 for t in self.targets}
            row = out.setdefault(o.kind, {"count": 0, "flops": 0.0, "bytes": 0.0, "seconds": zero})
            row["count"] += 1
            row["flops"] += o.flops
            row["bytes"] += o.bytes
            for t in self.targets:
                row["seconds"][t.name] += t.op_time(o)
        return out

    def __str__(self) -> str:
        names = [t.name for t in self.targets]
        where = "per device" if self.per_device else "one device"
        lines = [f"{self.step}: batch {self.batch} x {self.tokens} tokens, cache {self.cache} "
                 f"({where}); roofline time per target in microseconds",  # fmt: skip
                 f"{'op':<12} {'count':>5} {'GFLOP':>9} {'MB':>9} {'flop/B':>7} "
                 + " ".join(f"{n:>10}" for n in names)]  # fmt: skip
        rows = self.by_kind()
        rows["total"] = {"count": len(self.ops), "flops": self.flops, "bytes": self.bytes,
                         "seconds": {n: sum(r["seconds"][n] for r in rows.values())
                                     for n in names}}  # fmt: skip
        for kind, r in rows.items():
            intensity = r["flops"] / r["bytes"] if r["bytes"] else 0.0
            lines.append(f"{kind:<12} {r['count']:>5} {r['flops'] / 1e9:>9.3f} "
                         f"{r['bytes'] / 1e6:>9.2f} {intensity:>7.1f} "
                         + " ".join(f"{r['seconds'][n] * 1e6:>10.1f}" for n in names))  # fmt: skip
        lines += [f"  {t.name}: {t.source}" for t in self.targets]
        return "\n".join(lines)


# ------------------------------------------------------------------ costing the graph
_FREE = {"reshape", "broadcast_in_dim", "squeeze", "expand_dims", "iota", "slice",
         "dynamic_slice", "concatenate", "pad", "transpose", "select_n", "copy",
         "optimization_barrier", "stop_gradient", "convert_element_type", "gather"}  # fmt: skip


def _nbytes(avals) -> float:
    return float(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in avals))


def _rows(x) -> int:
    return math.prod(x.shape[:-1])


def _dtype_class(dtype) -> str:
    name = np.dtype(dtype).name
    return name if name in ("bfloat16", "int8") else "float32"


def step_ops(jaxpr, names: dict, scale: float = 1.0) -> list[OpCost]:
    """The OpCosts of a jaxpr's equations (`names`: input var -> weight name); inner
    jaxprs (jit, shard_map) are walked; ops outside a shard_map of a sharded step are
    global and counted at `scale` (1 / devices)."""
    out = []
    for eqn, x_read in _members(jaxpr.eqns):
        prim = eqn.primitive.name
        inner = [v for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr")]
        if inner:
            sub = getattr(inner[0], "jaxpr", inner[0])
            given = (names.get(v) if _var(v) else None for v in eqn.invars)
            local = dict(zip(sub.invars, given, strict=False))
            out += step_ops(sub, local, 1.0 if prim == "shard_map" else scale)
            continue
        ins = [v.aval for v in eqn.invars]
        outs = [v.aval for v in eqn.outvars]
        weight = next((names[v] for v in eqn.invars if _var(v) and names.get(v)), "")
        cost = _semantic(prim, eqn, ins, outs)
        if cost is not None:
            flops, dtype = cost
            if prim == ops.attention_p.name:  # reads the cache, writes the new k / v rows
                moved = _nbytes(ins) + _nbytes(outs[:1]) + _nbytes(ins[1:3])
            elif prim in (ops.embed_p.name, ops.qembed_p.name):  # the rows looked up
                moved = _nbytes(ins[:1]) + 2 * _nbytes(outs)
            else:
                moved = _nbytes(ins[1:] if x_read else ins) + _nbytes(outs)
            out.append(OpCost(prim, weight, flops, moved, dtype))
        elif prim in _COLLECTIVES:
            out.append(OpCost("collective", prim, 0.0, _nbytes(ins), "float32"))
        elif prim not in _FREE:
            out.append(OpCost("other", "", scale * sum(math.prod(a.shape) for a in outs),
                              scale * _nbytes(outs), "float32"))  # fmt: skip
    return out


def _members(eqns):
    """(equation, whether its x was read already) for each of `eqns`, a fused op as its
    members (projections of one activation): the first member reads x, the others share
    that read (one kernel call, or one fusion, reads it once)."""
    from pallax.ir.primitives.fused import member_eqns

    for top in eqns:
        fused = getattr(top.primitive, "member_primitives", None)
        for k, eqn in enumerate(member_eqns(top) if fused else [top]):
            yield eqn, k > 0


def _var(v) -> bool:
    return not isinstance(v, jcore.Literal)


def _semantic(prim, eqn, ins, outs):
    """(flops, compute dtype) of a semantic op, None for any other."""
    if prim in (ops.linear_p.name, ops.lm_head_p.name):
        x, w = ins[0], ins[1]
        return 2.0 * _rows(x) * math.prod(w.shape), _dtype_class(w.dtype)
    if prim == ops.qlinear_p.name:
        x, p = ins[0], eqn.params
        o = outs[0].shape[-1]
        per_channel = p["bits"] == 8 and p["group_size"] >= p["in_features"]
        dtype = "int8" if per_channel else _dtype_class(x.dtype)
        return 2.0 * _rows(x) * p["in_features"] * o, dtype
    if prim == ops.attention_p.name:
        q, kv_len = ins[0], _cache_len(ins[5:])
        b, t, n, h = q.shape
        window = eqn.params.get("sliding_window")
        # each query sees the cache before the chunk and, causally, the chunk up to itself
        seen = kv_len - t + (t + 1) / 2 if t > 1 else kv_len
        seen = min(seen, window) if window else seen
        return 4.0 * b * t * n * h * seen, _dtype_class(q.dtype)
    if prim in (ops.rms_norm_p.name, ops.rope_p.name, ops.mlp_act_p.name):
        return 4.0 * math.prod(outs[0].shape), "float32"
    if prim in (ops.embed_p.name, ops.qembed_p.name):  # reads only the rows it looks up
        return 0.0, "float32"
    return None


def _cache_len(cache) -> int:
    """Cached tokens an attention reads: the rows of its largest cache array [B, K, S, ...]
    (a dense cache; KIVI's packed rows)."""
    return max((a.shape[2] for a in cache if len(a.shape) >= 3), default=0)


def report(graph, step: str, targets) -> CostReport:
    s = graph.step(step)
    jaxpr = s.jaxpr.jaxpr
    names = {v: label for v, label in zip(jaxpr.invars, s.input_names, strict=True)
             if not label.startswith(("cache:", "tokens", "pos", "logits_index"))}  # fmt: skip
    mesh = graph.meta.get("mesh")
    devices = 1 if mesh is None else math.prod(mesh.shape.values())
    costs = step_ops(jaxpr, names, 1.0 / devices)
    return CostReport(step, s.spec.batch, s.spec.length, s.spec.cache_len, mesh is not None,
                      tuple(costs), tuple(target(t) for t in targets))  # fmt: skip


PLATFORM_TARGETS = {"cpu": ("cpu",), "cuda": ("h100",), "tpu": ("tpu-v5e",)}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def step_cost(compiled, step, platform, shape, targets) -> CostReport:
    if platform not in PLATFORM_TARGETS:
        raise ValueError(f"platform={platform!r}; known: {list(PLATFORM_TARGETS)}")
    if targets is None:
        targets = PLATFORM_TARGETS[platform]
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets) or not targets:
        raise ValueError(f"targets={targets!r} must be a list of names from {list(TARGETS)}")
    for t in targets:  # before the graph is captured
        check_target(t)
    graph = compiled._step_graph(step, *shape)[0]
    return report(graph, step, targets)


def collectives(compiled, step, platform) -> dict[str, int]:
    """`CompiledModel.collectives`: counted in XLA's compiled HLO, or in the StableHLO
    lowered for `platform`."""
    import re

    if platform is None and not compiled.abstract:
        fn, args = compiled._step(step, None, None)
        hlo = fn.lower(*args).compile().as_text()
        # "%x = f32[..] all-reduce(" or, combined, "= (f32[..], f32[..]) all-reduce-start("
        return {op: len(re.findall(rf"\s{op}(-start)?\(", hlo)) for op in COLLECTIVES}
    text = compiled.lower(step, (platform or "tpu",)).mlir_module()
    return {op: len(re.findall(rf"stablehlo\.{op.replace('-', '_')}\b", text))
            for op in COLLECTIVES}  # fmt: skip


# ----------------------------------------------------------------------------- memory
def memory_report(compiled, budget_bytes, context, page_size=None) -> dict:
    """`CompiledModel.memory_report`."""
    from pallax.runtime import kv_pages
    from pallax.runtime.engine_steps import positive_int

    page = None if page_size is None else positive_int("page_size", page_size)
    g = compiled.pipeline_graph()
    try:  # the engine's paged cache (Engine(kv_pages=...)), where the format can page
        page = kv_pages.default_page(g.cache) if page is None else page
        kv_pages.check_layout(g, page)
        per_page = page * g.cache.bytes_per_token()
    except ValueError:
        per_page = None
    report = {
        "weight_bytes": g.weight_bytes(),
        "kv_bytes_per_token": g.cache.bytes_per_token(),
        "kv_fixed_bytes_per_sequence": g.cache.fixed_bytes(),
        "kv_layout": g.cache.kind,
        "kv_page_size": page,
        "kv_bytes_per_page": per_page,  # None where the format cannot page
    }
    mesh = g.meta.get("mesh")
    data = 1
    if mesh is not None:  # sharded: what one device holds
        data = mesh.shape["data"]
        heads = mesh.shape["tensor"] if "tensor" in tuple(g.meta["cache_spec"]) else 1
        report.update(
            mesh=dict(mesh.shape),
            weight_bytes_per_device=_bytes_per_device(g.weights, g.meta["weight_specs"], mesh),
            kv_bytes_per_token_per_device=report["kv_bytes_per_token"] / heads,
            kv_fixed_bytes_per_sequence_per_device=report["kv_fixed_bytes_per_sequence"] / heads,
        )
    if budget_bytes is None:
        if context is not None:
            raise ValueError("memory_report: context= needs budget_bytes=")
        return report
    for name, value in (("budget_bytes", budget_bytes), ("context", context)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"memory_report: {name}={value!r} must be a positive integer")
    context = compiled.config.context_length if context is None else context
    # budget_bytes is one device's memory; a sharded model fills `data` replicas
    suffix = "_per_device" if mesh is not None else ""
    free = budget_bytes - report["weight_bytes" + suffix]
    per_seq = (
        context * report["kv_bytes_per_token" + suffix]
        + report["kv_fixed_bytes_per_sequence" + suffix]
    )
    batch = data * max(0, int(free // per_seq)) if free > 0 else 0
    report.update(
        budget_bytes=budget_bytes,
        context=context,
        max_batch=batch,
        max_batch_x_context=batch * context,
    )
    if report["kv_bytes_per_page"] is not None:  # what the budget buys an engine
        report["kv_pages"] = max(0, int(free // report["kv_bytes_per_page"]))
    return report


def _bytes_per_device(weights, specs, mesh) -> int:
    """Bytes of the weights one device holds: each array divided by its split."""
    from jax.sharding import PartitionSpec

    from pallax.passes.shard import leaf_specs

    total = 0
    for name, w in weights.items():
        tree = leaf_specs(w, specs[name])
        leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
        for leaf, spec in zip(jax.tree.leaves(w), leaves, strict=True):
            split = 1
            for axis in spec:
                split *= mesh.shape[axis] if axis is not None else 1
            total += int(leaf.size) * leaf.dtype.itemsize // split
    return total
