"""Every KV storage format x slot policy (ir/kvcache/): the reference against dense
attention where nothing is lost, chunking invariance, and both real models through the
passes (score within each method's budget, generation, memory report)."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallax
from pallax.ir import primitives as ops
from pallax.ir.kvcache import DENSE, FULL, H2O, Int8, Kivi, Sinks, core

T = 60  # tokens written in the synthetic tests
FORMATS = {"dense": DENSE, "int8": Int8(), "kivi8": Kivi(8, 16, 16, "float32", 16)}
# Policies that keep all T tokens: nothing is evicted, so each equals the full cache.
KEEP_ALL = {"full": FULL, "sinks": Sinks(4, T), "h2o": H2O(T + 16, 8)}
TOL = {"dense": 2e-5, "int8": 3e-2, "kivi8": 3e-2}
CHUNKINGS = ([T], [9, 40, 1, 10], [1] * T)
COMBOS = list(itertools.product(FORMATS, KEEP_ALL))


def _state(fmt, pol, b=2, kv=2, h=32, s=64):
    size = lambda d: {"B": b, "S": s}.get(d, d) if "/" not in str(d) else s // int(d[2:])  # noqa: E731
    return {
        n: jnp.zeros(tuple(size(d) for d in shape), dt)
        for n, (shape, dt) in core.layer_parts(fmt, pol, kv, h, jnp.float32).items()
    }


def _tokens(b=2, kv=2, n=4, h=32):
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((b, T, x, h)).astype(np.float32) for x in (n, kv, kv))
    k[..., 3] += 4.0  # an outlier channel, as keys have
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


@functools.cache
def _step(fmt, pol):
    return jax.jit(functools.partial(core.reference, fmt=fmt, policy=pol, rope=(10000.0, 1.0),
                                     scale=0.2, sliding_window=None, softcap=None))  # fmt: skip


def _run(fmt, pol, chunks):
    q, k, v = _tokens()
    state, outs, pos = _state(fmt, pol), [], 0
    b = q.shape[0]
    for t in chunks:
        sl = slice(pos, pos + t)
        out, state = _step(fmt, pol)(
            q[:, sl], k[:, sl], v[:, sl], jnp.full(b, pos, jnp.int32), jnp.full(b, t, jnp.int32),
            state,
        )  # fmt: skip
        outs.append(out)
        pos += t
    return np.concatenate([np.asarray(o) for o in outs], axis=1), state


def _dense_reference():
    q, k, v = _tokens()
    cache = jnp.zeros((2, 2, 64, 32))
    out, _, _ = ops.dense_attention(q, k, v, cache, cache, jnp.zeros(2, jnp.int32), scale=0.2,
                                    sliding_window=None, softcap=None)  # fmt: skip
    return np.asarray(out)


@pytest.mark.parametrize("fmt, pol", COMBOS)
def test_budgets_that_keep_everything_attend_as_dense(fmt, pol):
    """Prefill, chunks and token-by-token decode, each format under each policy with room
    for every token, match dense attention within the format's error."""
    want = _dense_reference()
    for chunks in CHUNKINGS:
        got, _ = _run(FORMATS[fmt], KEEP_ALL[pol], chunks)
        np.testing.assert_allclose(got, want, atol=TOL[fmt], rtol=TOL[fmt], err_msg=str(chunks))


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("pol", [FULL, Sinks(4, 20), Sinks(0, 24)], ids=str)
def test_the_cache_does_not_depend_on_how_the_text_was_chunked(fmt, pol):
    """The same tokens written as one prefill, chunks or one by one leave the same cache
    (the sinks ring smaller than the text: tokens evicted along the way)."""
    _, first = _run(FORMATS[fmt], pol, CHUNKINGS[0])
    for chunks in CHUNKINGS[1:]:
        _, other = _run(FORMATS[fmt], pol, chunks)
        for name in first:
            np.testing.assert_allclose(np.asarray(other[name], np.float32),
                                       np.asarray(first[name], np.float32), atol=1e-6,
                                       err_msg=f"{name} {chunks}")  # fmt: skip


def test_sinks_window_sees_the_sinks_and_the_newest_keys():
    """With a small window, the last query's output equals dense attention over exactly
    the sinks and the window (no rotation shift while the query's rank is its position)."""
    pol = Sinks(2, 8)
    q, k, v = _tokens()
    got, _ = _run(DENSE, pol, [1] * 9)  # query 8: rank 8 <= slots - 1 = 9
    keys = jnp.concatenate([k[:, :2], k[:, 1:9]], axis=1)[:, 1:]  # positions 0, 1, 2..8
    del keys
    keep = np.zeros(T, bool)
    keep[:2] = keep[1:9] = True
    qq, kk, vv = q[:, 8:9], k[:, :9][:, keep[:9]], v[:, :9][:, keep[:9]]
    want = core.attend(
        qq, jnp.swapaxes(kk, 1, 2), jnp.swapaxes(vv, 1, 2),
        jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 2, 9)), jnp.full((2, 1), 8),
        jnp.ones((2, 1), bool), FULL, n_cand=0, rope=None, scale=0.2, sliding_window=None,
        softcap=None, mass=False,
    )[0]  # fmt: skip
    np.testing.assert_allclose(got[:, 8:9], np.asarray(want), atol=2e-5)


# ------------------------------------------------------------------ real models
FMT_PASSES = {"dense": [], "int8": ["compress_kv:int8"], "kivi2": ["kivi2"]}
POL_PASSES = {
    "full": [],
    "sinks": ["evict_kv:sinks:sinks=4:window=124"],
    "h2o": ["evict_kv:h2o:budget=128:recent=16"],
}
# mean |log-prob difference| to the dense cache over ~270 tokens, each method's budget
BUDGET = {"dense": 0.0, "int8": 0.05, "kivi2": 0.15}
POL_BUDGET = {"full": 0.0, "sinks": 0.25, "h2o": 0.15}


@pytest.fixture(scope="module")
def text():
    from pallax.scripts.eval_ppl import DEFAULT_TEXT

    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        return f.read()[:1100]


# SmolLM2: each format and each policy at least once, KIVI-2 under an evicting policy
# (all nine took 590 s of the suite on a 2-core VM, KIVI-2 x sinks besides ~45 s of a
# fast one; every format x policy pair runs on the reference above and in the graph and
# memory report below, KIVI with sinks in the CPU kernel's tests
# (tests/cpu_kernels/test_kivi_attention_cpu.py), and the engine tests run more pairs:
# int8 + int8kv, int4 + H2O, bf16 + sinks)
SMOLLM2_COMBOS = [("dense", "full"), ("int8", "sinks"), ("kivi2", "h2o")]


@pytest.mark.parametrize("fmt, pol", list(itertools.product(FMT_PASSES, POL_PASSES)))
def test_smollm2_every_combination_in_the_graph_and_the_memory_report(smollm2, fmt, pol):
    """Before/after on the real model, every format x policy (no XLA compile): the graph
    names the format and the policy, and the memory report counts the format's bytes
    (per token for the full policy, fixed otherwise)."""
    c = pallax.compile(smollm2, passes=FMT_PASSES[fmt] + POL_PASSES[pol])
    graph = c.graph("decode")
    assert graph.count("attention[") == smollm2.config.n_layers
    assert ("format=dense" in graph) == (fmt == "dense")
    assert f"policy={pol}" in graph
    cfg = smollm2.config
    per_layer_token = {"dense": 2 * 64 * 4, "int8": 2 * (64 + 4), "kivi2": 4320 / 30 / 3}
    rep = c.memory_report()
    if pol == "full":
        want = cfg.n_layers * cfg.n_kv_heads * per_layer_token[fmt]
        assert rep["kv_bytes_per_token"] == pytest.approx(want)
    else:
        assert rep["kv_bytes_per_token"] == 0
        rows = {"sinks": 124, "h2o": 128 if fmt != "kivi2" else 96}[pol]
        assert rep["kv_fixed_bytes_per_sequence"] >= (
            cfg.n_layers * cfg.n_kv_heads * per_layer_token[fmt] * rows
        )


@pytest.mark.slow
@pytest.mark.parametrize("fmt, pol", SMOLLM2_COMBOS)
def test_smollm2_combinations_score_and_generate(smollm2, compiled_fp32, text, fmt, pol):
    """The score stays within the methods' budgets and generation runs."""
    c = pallax.compile(smollm2, passes=FMT_PASSES[fmt] + POL_PASSES[pol])
    ref = compiled_fp32.score(text, chunk_size=64)
    got = c.score(text, chunk_size=64)
    delta = float(np.abs(got - ref).mean())
    print(f"{fmt} x {pol}: mean |dlogprob| {delta:.4f}")
    assert delta <= BUDGET[fmt] + POL_BUDGET[pol] + 1e-4
    (out,) = c.generate(["The capital of France is"], max_new_tokens=6)
    assert len(out.token_ids) == 6


# Gemma: each compressed format once and an evicting policy (a Gemma compile is ~20-30 s
# on 2 cores; five combinations took 300 s). Its sliding-window layers keep their ring
# under H2O as under sinks (the graph check below); sinks on SmolLM2 above.
GEMMA_COMBOS = [("int8", "h2o"), ("kivi2", "full")]


@pytest.mark.slow
def test_gemma3_combinations(gemma3):
    """Gemma 3: its sliding-window layers keep a ring of their own window under either
    policy (exact for them); each combination compiles, scores and generates."""
    text = "The quick brown fox jumps over the lazy dog. " * 8
    dense = pallax.compile(gemma3)
    ref = dense.score(text, chunk_size=32)
    for fmt, pol in GEMMA_COMBOS:
        c = pallax.compile(gemma3, passes=FMT_PASSES[fmt] + POL_PASSES[pol])
        graph = c.graph("decode")
        if pol != "full":
            assert f"policy=sinks(sinks=0, window={gemma3.config.sliding_window})" in graph
        got = c.score(text, chunk_size=32)
        delta = float(np.abs(got - ref).mean())
        print(f"gemma3 {fmt} x {pol}: mean |dlogprob| {delta:.4f}")
        assert np.isfinite(got).all() and delta <= 2 * (BUDGET[fmt] + POL_BUDGET[pol]) + 1e-3
        (out,) = c.generate(["Once upon a time"], max_new_tokens=4)
        assert len(out.token_ids) == 4


def test_kivi_h2o_budget_it_cannot_hold_is_refused_before_compile(smollm2):
    with pytest.raises(ValueError, match="recent=200 must be <= the KIVI residual=128"):
        pallax.compile(smollm2, passes=["kivi2", "evict_kv:h2o:budget=256:recent=200"])
    with pytest.raises(ValueError, match="must hold at least one group"):
        pallax.compile(smollm2, passes=["evict_kv:h2o:budget=40:recent=16", "kivi2"])
