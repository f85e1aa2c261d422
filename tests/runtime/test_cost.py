"""CompiledModel.cost: flops and bytes per op from the graph, roofline times on targets."""

from __future__ import annotations

import math

import pytest

import pallax
from pallax.runtime import cost as cost_mod


def _kind(report, kind):
    return [o for o in report.ops if o.kind == kind]


def test_decode_costs_are_the_weights_and_the_cache(compiled_fp32, smollm2):
    cfg = smollm2.config
    r = compiled_fp32.cost("decode", targets=["h100"], batch=1, cache=512)
    assert (r.step, r.batch, r.tokens, r.cache, r.per_device) == ("decode", 1, 1, 512, False)
    linears = _kind(r, "linear")
    assert len(linears) == 7 * cfg.n_layers
    weights = compiled_fp32.weights
    # one row through every projection: 2 flops per weight, each weight read once
    assert sum(o.flops for o in linears) == 2 * sum(weights[o.name].size for o in linears)
    assert sum(o.bytes for o in linears) >= sum(weights[o.name].nbytes for o in linears)
    # fused q / k / v and gate / up read their activation once each: 2 + 1 fewer reads
    # of a float32 row of `dim` per layer than the unfused graph's
    unfused = pallax.compile(smollm2, ["-fuse_projections"])
    u = unfused.cost("decode", targets=["h100"], batch=1, cache=512)
    saved = sum(o.bytes for o in _kind(u, "linear")) - sum(o.bytes for o in linears)
    assert saved == (2 + 1) * 4 * cfg.dim * cfg.n_layers
    assert sum(o.flops for o in _kind(u, "linear")) == sum(o.flops for o in linears)
    (head,) = _kind(r, "lm_head")
    assert head.flops == 2 * cfg.vocab_size * cfg.dim
    (emb,) = _kind(r, "embed")
    assert emb.bytes < 3 * 4 * cfg.dim + 8  # the row looked up, not the table
    att = _kind(r, "attention")
    assert len(att) == cfg.n_layers
    h = cfg.dim // cfg.n_heads
    assert att[0].flops == 4 * cfg.n_heads * h * 512
    kv_read = 2 * cfg.n_kv_heads * 512 * h * 4  # the float32 k and v caches of a layer
    assert kv_read < att[0].bytes < kv_read * 1.1
    # twice the cache: twice the attention, the same projections
    r2 = compiled_fp32.cost("decode", targets=["h100"], batch=1, cache=1024)
    assert _kind(r2, "attention")[0].flops == 2 * att[0].flops
    assert sum(o.flops for o in _kind(r2, "linear")) == sum(o.flops for o in linears)
    # the roofline: each op's max(compute, memory) time, summed
    t = cost_mod.DATASHEETS["h100"]
    assert r.time("h100") == pytest.approx(
        sum(max(o.flops / t.flops[o.dtype], o.bytes / t.bandwidth) for o in r.ops)
    )
    # one decode row is memory-bound: about the weight bytes over HBM bandwidth
    assert r.time("h100") == pytest.approx(r.bytes / t.bandwidth, rel=0.05)


def test_quantized_weights_and_kivi_move_fewer_bytes(smollm2):
    dense = pallax.compile(smollm2).cost("decode", "tpu", batch=8, cache=4096)
    packed = pallax.compile(smollm2, ["int8", "kivi2"]).cost("decode", "tpu", batch=8, cache=4096)
    assert [t.name for t in packed.targets] == ["tpu-v5e"]
    lin = sum(o.bytes for o in _kind(dense, "linear"))
    qlin = _kind(packed, "qlinear")
    assert {o.dtype for o in qlin} == {"int8"}  # W8A8 at the int8 peak
    assert 0.24 * lin < sum(o.bytes for o in qlin) < 0.3 * lin
    a_dense = sum(o.bytes for o in _kind(dense, "attention"))
    a_kivi = sum(o.bytes for o in _kind(packed, "attention"))
    assert a_kivi < a_dense / 5  # 2-bit K and V with bf16 scales, against float32
    assert packed.time("tpu-v5e") < dense.time("tpu-v5e")
    text = str(packed)
    assert "qlinear" in text and "total" in text and "tpu-v5e" in text


def test_prefill_attention_is_causal_and_prefill_compute_bound(compiled_fp32, smollm2):
    cfg = smollm2.config
    r = compiled_fp32.cost("prefill", "cuda", batch=1, cache=1024, tokens=1024)
    (att, *_) = _kind(r, "attention")
    h = cfg.dim // cfg.n_heads
    assert att.flops == 4 * 1024 * cfg.n_heads * h * (1024 + 1) / 2
    linear_flops = sum(o.flops for o in _kind(r, "linear"))
    assert linear_flops == 1024 * 2 * sum(compiled_fp32.weights[o.name].size
                                          for o in _kind(r, "linear"))  # fmt: skip
    # a 1024-token chunk is compute-bound on this CPU (about 100 flops per byte against a
    # ridge near 5); one decode row is memory-bound (0.5 flops per byte)
    cpu = cost_mod.target("cpu")
    assert all(o.flops / cpu.flops["float32"] > o.bytes / cpu.bandwidth
               for o in _kind(r, "linear"))  # fmt: skip
    decode = compiled_fp32.cost("decode", batch=1, cache=1024)
    assert all(o.flops / cpu.flops["float32"] < o.bytes / cpu.bandwidth
               for o in _kind(decode, "linear"))  # fmt: skip


def test_a_sharded_plan_costs_per_device():
    """Llama-3-8B planned at tensor=8 (abstract weights and mesh): each device reads 1/8
    of every projection, and the collectives move bytes over the interconnect."""
    m = pallax.load("llama-3-8b")
    whole = pallax.compile(m, ["int8"]).cost("decode", "tpu")
    c = pallax.compile(m, ["int8", "shard:tensor=8:abstract=true"])
    r = c.cost("decode", "tpu")
    assert r.per_device
    q_whole = sum(o.bytes for o in _kind(whole, "qlinear"))
    q_dev = sum(o.bytes for o in _kind(r, "qlinear"))
    assert q_whole / 8 < q_dev < q_whole / 8 * 1.1  # plus the gathered activations
    coll = _kind(r, "collective")
    assert len(coll) == 4 * m.config.n_layers + 1 and all(o.bytes > 0 for o in coll)
    assert math.isclose(sum(o.flops for o in _kind(r, "qlinear")) * 8,
                        sum(o.flops for o in _kind(whole, "qlinear")), rel_tol=1e-6)  # fmt: skip


def test_the_cpu_target_is_measured_and_bad_input_is_refused(compiled_fp32):
    cpu = cost_mod.target("cpu")
    assert cpu.flops["float32"] > 1e9 and cpu.bandwidth > 1e9 and "measured here" in cpu.source
    r = compiled_fp32.cost("decode")
    assert [t.name for t in r.targets] == ["cpu"] and r.time("cpu") > 0
    for kwargs, match in [
        (dict(platform="gpu"), "platform='gpu'; known: \\['cpu', 'cuda', 'tpu'\\]"),
        (dict(targets=["a100"]), "unknown cost target 'a100'; known: \\['cpu', 'h100'"),
        (dict(targets="h100"), "must be a list of names"),
        (dict(step="score"), "step='score' must be 'prefill' or 'decode'"),
        (dict(step="prefill", cache=256, tokens=512), "tokens=512 must be at most cache=256"),
        (dict(tokens=4), "tokens=4 must be at most cache=256 \\(1 for decode\\)"),
        (dict(batch=0), "batch=0 must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            compiled_fp32.cost(**kwargs)
