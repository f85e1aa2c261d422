"""Graph capture, printer, verifier and the rewrite helper on the real model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax.ir import primitives as ops
from pallax.ir.rewrite import rewrite
from pallax.ir.verify import verify
from pallax.passes import GraphError, StepSpec, capture, run_passes


@pytest.fixture(scope="module")
def graph(smollm2):
    specs = [StepSpec("prefill", 2, 16, 64), StepSpec("decode", 2, 1, 64)]
    return capture(smollm2.forward, smollm2.weights, smollm2.cache_layout(), specs, {})


def _run_decode(graph, steps=3):
    cache = graph.cache.allocate(2, 64)
    tokens = jnp.asarray(np.arange(32, dtype=np.int32).reshape(2, 16) + 100)
    fn = jax.jit(lambda w, c, *a: graph.run("prefill", w, c, *a))
    logits, cache = fn(graph.weights, cache, tokens, jnp.zeros(2, jnp.int32), jnp.asarray([15, 9]))
    out = [logits]
    dec = jax.jit(lambda w, c, *a: graph.run("decode", w, c, *a))
    pos = jnp.asarray([16, 10], jnp.int32)
    for _ in range(steps):
        tok = jnp.argmax(out[-1], -1).astype(jnp.int32)[:, None]
        logits, cache = dec(graph.weights, cache, tok, pos)
        out.append(logits)
        pos = pos + 1
    return np.stack([np.asarray(x) for x in out])


def test_decode_graph_shows_semantic_ops(graph, smollm2):
    from pallax.ir.printer import format_graph

    text = format_graph(graph, "decode")
    n = smollm2.config.n_layers
    for op, count in (("embed", 1), ("rms_norm", 2 * n + 1), ("linear", 7 * n), ("rope", 2 * n),
                      ("attention", n), ("mlp_act", n), ("lm_head", 1)):  # fmt: skip
        assert f"{op} x{count}" in text, (op, text.splitlines()[-1])
    assert "layers.0.wq" in text and "cache:layers.29.v" in text


def test_verifier_rejects_mismatched_weights(graph):
    bad = dict(graph.weights)
    bad["layers.0.wq"] = bad["layers.0.wq"][:, :10]
    with pytest.raises(GraphError, match="layers.0.wq"):
        verify(graph.replace(weights=bad))


def test_verifier_rejects_cache_layout_mismatch(graph):
    wrong = graph.cache.with_dtype(jnp.bfloat16)
    with pytest.raises(GraphError, match="cache"):
        verify(graph.replace(cache=wrong))


def test_identity_rewrite_preserves_outputs(graph):
    again = rewrite(graph)
    assert len(again.steps["decode"].jaxpr.jaxpr.eqns) == len(
        graph.steps["decode"].jaxpr.jaxpr.eqns
    )
    np.testing.assert_array_equal(_run_decode(again), _run_decode(graph))


def test_rewrite_rule_replaces_an_op(graph):
    """A rule keyed by primitive sees every equation of that op (here: zero the MLP)."""

    def zero_mlp(eqn, gate, up):
        return jnp.zeros_like(gate)

    seen = rewrite(graph, {ops.mlp_act_p: zero_mlp})
    text = str(seen.steps["decode"].jaxpr)
    assert "mlp_act" not in text
    assert not np.allclose(_run_decode(seen, 1), _run_decode(graph, 1))


@dataclasses.dataclass(frozen=True)
class _Broken:
    name: str = "broken"

    def __call__(self, g):
        w = dict(g.weights)
        w["final_norm"] = w["final_norm"][:5]
        return g.replace(weights=w)


def test_pass_manager_verifies_after_each_pass(graph):
    with pytest.raises(GraphError, match="final_norm"):
        run_passes(graph, [_Broken()])


def test_pass_manager_dumps_every_stage(graph):
    import pallax

    seen = []
    out = run_passes(
        graph, [pallax.passes.cast("bfloat16")], dump=lambda label, g: seen.append(label)
    )
    desc = "cast(dtype='bfloat16', activations=True, name='cast')"
    assert seen == ["input", f"after {desc}"]
    assert out.meta["passes"] == (desc,)


def test_check_order_names_both_passes():
    """Passes declare what they require, remove and provide; an impossible order is refused
    naming both passes, and an order the facts allow passes."""

    from pallax.ir.manager import check_order, initial_facts

    @dataclasses.dataclass(frozen=True)
    class Fake:
        name: str
        requires: frozenset = frozenset()
        removes: frozenset = frozenset()
        provides: frozenset = frozenset()

    fresh = initial_facts(packed_weights=False)
    fuse = Fake("fuse_qkv", requires=frozenset({"float weights"}), provides=frozenset({"fused"}))
    quant = Fake("quantize_weights", requires=frozenset({"float weights"}),
                 removes=frozenset({"float weights"}))  # fmt: skip
    check_order([fuse, quant], fresh)
    with pytest.raises(ValueError, match=r"pass 1 \(fuse_qkv\) requires float weights, but "
                       r"pass 0 \(quantize_weights\) before it removed them: run fuse_qkv "
                       r"before quantize_weights"):  # fmt: skip
        check_order([quant, fuse], fresh)
    with pytest.raises(ValueError, match="which the model lacks"):
        check_order([quant], initial_facts(packed_weights=True))
    needs_fused = Fake("lower_fused", requires=frozenset({"fused"}))
    check_order([fuse, needs_fused], fresh)
    with pytest.raises(ValueError, match=r"pass 0 \(lower_fused\) requires fused"):
        check_order([needs_fused, fuse], fresh)


def test_weight_memo_keeps_one_entry_per_family():
    """map_weights memoizes per key; with a family (the shard pass) only the latest key
    per input weights stays, so trying many meshes does not pile up placed copies."""
    import jax.numpy as jnp

    from pallax.ir import manager

    weights = {"w": jnp.ones((2, 2))}
    calls = []

    def fn(tag):
        return lambda ws: calls.append(tag) or {k: v * 2 for k, v in ws.items()}

    manager.map_weights(("cast", 1), weights, fn("cast"))
    manager.map_weights(("cast", 1), weights, fn("cast"))
    assert calls == ["cast"]  # memoized
    manager.map_weights(("shard", 1), weights, fn("a"), family="shard")
    manager.map_weights(("shard", 2), weights, fn("b"), family="shard")
    keys = [k[0] for k in manager._WEIGHT_MEMO if k[1] == (("w", id(weights["w"])),)]
    assert ("shard", 1) not in keys and ("shard", 2) in keys and ("cast", 1) in keys
    manager.map_weights(("shard", 1), weights, fn("a"), family="shard")
    assert calls == ["cast", "a", "b", "a"]  # recomputed: evicted by ("shard", 2)


def test_weight_memo_under_a_holder_lives_as_long_as_the_holder():
    """Under `holding(held)` (a compiled model's captures) the transformed weights live in
    `held`: hits while it lives, in any holder, and gone with the last holder, while the
    input weights live on (a model compiled under one pipeline after another)."""
    import gc
    import weakref

    import jax.numpy as jnp

    from pallax.ir import manager

    weights = {"w": jnp.ones((2, 2))}
    calls = []

    def fn(ws):
        calls.append(1)
        return {k: v * 2 for k, v in ws.items()}

    first, second = {}, {}
    with manager.holding(first):
        out = manager.map_weights(("int8",), weights, fn)
    with manager.holding(second):
        assert manager.map_weights(("int8",), weights, fn) is out  # a hit, now held twice
    assert len(calls) == 1 and len(first) == len(second) == 1
    gone = weakref.ref(out["w"])
    del out, first
    gc.collect()
    assert gone() is not None  # `second` still holds it
    del second
    gc.collect()
    assert gone() is None
    with manager.holding({}):
        manager.map_weights(("int8",), weights, fn)
    assert len(calls) == 2  # computed again for a new holder


def test_a_dropped_compiled_model_frees_its_transformed_weights(smollm2):
    """A model compiled under a pipeline, then dropped, leaves no transformed copy behind
    (the model itself lives on); new buckets of a live one reuse its weights."""
    import gc
    import weakref

    import pallax
    from pallax.ir.graph import StepSpec

    c = pallax.compile(smollm2, ["int8"])
    first = c._capture([StepSpec("decode", 1, 1, 256)]).weights["layers.0.wq"]
    again = c._capture([StepSpec("prefill", 2, 16, 512)]).weights["layers.0.wq"]
    assert again is first  # a new bucket: no second quantization
    gone = weakref.ref(first.data)
    del c, first, again
    gc.collect()
    assert gone() is None
