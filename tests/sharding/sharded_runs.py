"""Run in a subprocess with 8 virtual CPU devices (XLA_FLAGS must be set before jax is
imported, so the tests start this file as a script): one check per argument, each
printing one JSON line."""

from __future__ import annotations

import os
import sys

DEVICES = int(os.environ.get("PALLAX_TEST_DEVICES", "8"))
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
)

import json  # noqa: E402

import numpy as np  # noqa: E402
from sharding_prompts import PROMPTS, TEXT  # noqa: E402 (this directory: run as a script)

import pallax  # noqa: E402


def greedy(model: str, plan: str) -> dict:
    """Batch 8, prompts of different lengths: under each pipeline ("fp32" for none, "gguf"
    for the file's own blocks; last in `plan`) and mesh of `plan` ("fp32=1x8,2x4;kivi2=2x4"),
    the greedy tokens against the unsharded run's (and, quantized, the scores)."""
    m = pallax.load(model)
    out = {}
    for item in plan.split(";"):
        name, _, meshes = item.rpartition("=")
        passes = [] if name in ("fp32", "gguf") else [name]
        if name == "gguf":  # the GGUF file's own blocks (keep_quantized)
            m = pallax.load(model, keep_quantized=True)
        base = pallax.compile(m, passes=passes)
        packed = name.startswith(("int", "quantize", "gguf"))
        ref = base.score(TEXT, chunk_size=16) if packed else None
        want = [o.token_ids for o in base.generate(PROMPTS, max_new_tokens=8)]
        for mesh in meshes.split(","):
            t, d = map(int, mesh.split("x"))
            c = pallax.compile(m, passes=[*passes, f"shard:tensor={t}:data={d}"])
            got = [o.token_ids for o in c.generate(PROMPTS, max_new_tokens=8)]
            r = {"equal": got == want,
                 "rows_equal": sum(g == w for g, w in zip(got, want, strict=True))}  # fmt: skip
            if ref is not None:
                delta = np.abs(c.score(TEXT, chunk_size=16) - ref)
                r.update(max_dlogprob=float(delta.max()), mean_dlogprob=float(delta.mean()))
            out[f"{name} {mesh}"] = r
            _release(c)
        _release(base)
    return out


def lazy(model: str) -> dict:
    """A lazily loaded model (the GGUF file; a pallax checkpoint of int8 weights) placed
    on meshes: its text against the eagerly loaded model's, and what each placement read
    of a split weight (every device reads its own slice)."""
    eager = pallax.load(model)
    want = [o.text for o in pallax.compile(eager, ["shard:tensor=4:data=2"]).generate(
        PROMPTS, max_new_tokens=8)]  # fmt: skip
    out = {}
    for passes in (["shard:tensor=4:data=2"], ["shard:tensor=8"]):
        m = pallax.load(model, lazy=True)
        c = pallax.compile(m, passes)
        got = [o.text for o in c.generate(PROMPTS, max_new_tokens=8)]
        out[",".join(passes)] = {"equal": got == want, "reads": _reads(m),
                                 "placed": type(c.weights["embed"]).__name__}  # fmt: skip
        _release(c)
    # a pallax checkpoint of int8 weights: its packed arrays are read by slices too
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path, passes = f"{tmp}/int8", ["shard:tensor=4:data=2"]
        pallax.compile(eager, ["int8"]).save(path)
        base = pallax.compile(pallax.load(path), passes)
        want = [o.text for o in base.generate(PROMPTS, max_new_tokens=8)]
        _release(base)
        m = pallax.load(path, lazy=True)
        c = pallax.compile(m, passes)
        got = [o.text for o in c.generate(PROMPTS, max_new_tokens=8)]
        placed = type(c.weights["embed"]).__name__
        out["checkpoint-int8," + passes[0]] = {"equal": got == want, "reads": _reads(m),
                                               "placed": placed}  # fmt: skip
        _release(c)
    return out


def _reads(m) -> dict:
    """What placing read of three weights (a packed one: its int8 data), as fractions of
    the weight: [all reads, the largest read]."""
    import jax

    out = {}
    for name in ("embed", "layers.0.wq", "layers.0.w_down"):
        leaf = jax.tree.leaves(m.weights[name])[0]
        out[name] = [leaf.reads[0] / leaf.size, leaf.reads[1] / leaf.size]
    return out


def _release(compiled) -> None:
    """Free a compiled model's device arrays now, not when the caller's name for it is
    rebound: a 1x8 mesh holds 8 copies of the weights (this machine: 24 GiB)."""
    import gc

    import jax

    from pallax.ir import manager

    compiled._fns.clear()
    compiled._display = None
    manager._WEIGHT_MEMO.clear()
    del compiled
    jax.clear_caches()
    gc.collect()


def collectives(model: str) -> dict:
    """Collectives in the compiled sharded decode step and the bytes per device."""
    m = pallax.load(model)
    c = pallax.compile(m, passes=["shard:tensor=4:data=2"])
    counts = c.collectives("decode")
    dense = pallax.compile(m).memory_report()
    rep = c.memory_report(budget_bytes=2**30, context=1024)
    return {
        "counts": counts,
        "layers": m.config.n_layers,
        "weight_ratio": rep["weight_bytes_per_device"] / dense["weight_bytes"],
        "report": {k: v for k, v in rep.items() if k != "mesh"},
        "graph_has_psum": "psum[axes=('tensor',)]" in c.graph("decode"),
        "graph_has_specs": "layers.0.wq P('tensor')" in c.graph("decode"),
        "int8": {
            exact: pallax.compile(
                m, passes=["int8", f"shard:tensor=4:data=2:exact={exact}"]
            ).collectives("decode")
            for exact in ("true", "false")
        },  # fmt: skip
    }


def artifact(path: str) -> dict:
    """Export a model sharded tensor=4 x data=2 (8 devices) to `path`, load it back and
    generate and score; on another device count, only load it (the refusal)."""
    if DEVICES != 8:
        try:
            pallax.load_artifact(path)
            return {"error": None}
        except ValueError as e:
            return {"error": str(e)}
    import json as json_

    m = pallax.load("smollm2-135m")
    c = pallax.compile(m, passes=["int8kv", "shard:tensor=4:data=2"])
    want = [o.text for o in c.generate(PROMPTS[:4], max_new_tokens=8)]
    c.export(path, batch_sizes=(4,), prefill_sizes=(16,), cache_sizes=(256,), score_chunk=16)
    a = pallax.load_artifact(path)
    got = [o.text for o in a.generate(PROMPTS[:4], max_new_tokens=8)]
    score = c.score(TEXT, chunk_size=16)
    delta = np.abs(a.score(TEXT, chunk_size=16) - score).max()
    manifest = json_.loads((__import__("pathlib").Path(path) / "manifest.json").read_text())
    try:
        c.export(path + "-odd", batch_sizes=(3,), prefill_sizes=(16,), cache_sizes=(256,))
        odd = None
    except ValueError as e:
        odd = str(e)
    return {"equal": got == want, "texts": got, "max_dlogprob": float(delta),
            "score": score.tolist(), "xla_cache": a.xla_cache, "xla_cache_hits": a.xla_cache_hits,
            "mesh": {k: manifest["mesh"][k] for k in ("data", "tensor", "devices")},
            "format_version": manifest["format_version"], "odd_batch": odd,
            "wq_rows": [a.weights["layers.0.wq"].shape[0],
                        a.weights["layers.0.wq"].addressable_shards[0].data.shape[0]]}  # fmt: skip


def errors() -> dict:
    import jax

    m = pallax.load("smollm2-135m")
    out = {}
    cases = {
        "too_many": lambda: pallax.compile(m, passes=["shard:tensor=8:data=2"]).graph(),
        "three_of_eight": lambda: pallax.compile(
            m, passes=[pallax.passes.shard(3, 1, devices=jax.devices())]
        ),
        "unknown_axis": lambda: pallax.passes.shard(2, rules=[("heads", "tensor")]),
        "bad_mesh_axis": lambda: pallax.passes.shard(2, rules=[("mlp", "model")]),
        "not_last": lambda: pallax.compile(m, passes=["shard:tensor=2", "int8"]),
        "straddle": lambda: pallax.compile(
            m, passes=["quantize_weights:4:group_size=128", "shard:tensor=2:exact=false"]
        ).graph(),
        "zero": lambda: pallax.passes.shard(0),
        "exact": lambda: pallax.passes.shard(2, exact="yes"),
        # at compile(), before the calibration that would find the outliers (~20 s)
        "outliers_split_inputs": lambda: pallax.compile(
            m, passes=["int8-outliers", "shard:tensor=2:exact=false"]
        ),
        "save": lambda: pallax.compile(m, passes=["int8", "shard:tensor=2"]).save("/nonexistent/x"),
        "export": lambda: pallax.compile(pallax.load("llama-3-8b")).export("/nonexistent/y"),
        "abstract_devices": lambda: pallax.passes.shard(2, devices=jax.devices(), abstract=True),
    }
    for name, fn in cases.items():
        try:
            fn()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    if kind == "greedy":
        result = greedy(rest[0], rest[1])
    elif kind == "collectives":
        result = collectives(rest[0])
    elif kind == "artifact":
        result = artifact(rest[0])
    elif kind == "lazy":
        result = lazy(rest[0])
    else:
        result = errors()
    print("RESULT " + json.dumps(result))
