"""Batch invariance (issue 17 item 7): a request's tokens do not depend on its batch-mates.

Every matmul, norm and attention path reduces each row in an order fixed by the row
alone (`primitives.base.BATCH_INVARIANT`, on by default): checked op by op, bit for bit,
over batch sizes, prefill chunk lengths and cache lengths, then end to end on SmolLM2:
a prompt's prefill logits alone and in a batch are the same bits in every weight format,
and its greedy text is the same (fp32 here; every weight format and the KIVI cache in
test_engine.py, where batches change every step, and tests/passes/test_kvcache.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallax
from pallax.ir import primitives as ops
from pallax.ir import qformat
from pallax.ir.primitives.attention import attention_core, tiled_attention
from pallax.runtime.requests import build_requests

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fib(n):",
    "Once upon a time, in a small village, there lived an old clockmaker who " * 4,
    "List five fruits:\n1.",
]


def test_row_sum_is_the_sum_in_an_order_fixed_by_the_row():
    rng = np.random.default_rng(0)
    for d in (37, 576, 640, 3000):
        x = rng.standard_normal((8, d)).astype(np.float32)
        got = np.asarray(jax.jit(ops.base.row_sum)(x))
        np.testing.assert_allclose(got, x.astype(np.float64).sum(-1), rtol=1e-5, atol=1e-4)
        one = np.asarray(jax.jit(ops.base.row_sum)(x[3:4]))
        assert one[0] == got[3]  # one row alone: the same bits as among eight


def _rows(f, w, d):
    """f's rows alone (decode [1, 1, D]; a 16-token chunk [1, 16, D]) against the same rows
    in bigger decode batches and longer prefill chunks: every pair bit-equal."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((130, d)).astype(np.float32)
    fn = jax.jit(f)
    alone = np.asarray(fn(jnp.asarray(x[None, :1]), w))[0, 0]
    for b in (2, 3, 8, 65, 130):
        got = np.asarray(fn(jnp.asarray(x[:b, None]), w))
        np.testing.assert_array_equal(got[0, 0], alone, err_msg=f"decode batch {b}")
    chunk = np.asarray(fn(jnp.asarray(x[None, :16]), w))[0]
    for b, t in ((4, 16), (1, 128), (3, 64)):
        xx = rng.standard_normal((b, t, d)).astype(np.float32)
        xx[b - 1, :16] = x[:16]
        got = np.asarray(fn(jnp.asarray(xx), w))[b - 1, :16]
        np.testing.assert_array_equal(got, chunk, err_msg=f"prefill {b}x{t}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float_linear_and_lm_head_rows_are_invariant(dtype):
    w = jnp.asarray(np.random.default_rng(2).standard_normal((200, 96)) * 0.1, dtype)
    _rows(ops.linear, w, 96)
    _rows(lambda x, t: ops.lm_head(x, t, softcap=30.0), w, 96)


@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 32), (4, 32), (4, 128)])
def test_quantized_linear_rows_are_invariant(bits, group_size):
    w = jnp.asarray(np.random.default_rng(3).standard_normal((200, 256)) * 0.1, jnp.float32)
    qw = qformat.quantize_rtn(w, bits, group_size)
    _rows(lambda x, _: ops.qlinear(x, qw), w, 256)


def _attend(b, t, s, pos0, q0, k0, v0, row, *, tiled=True, **kw):
    """Row `row` of a [b, t] query chunk at cache position pos0, over a cache of s slots
    whose first pos0 + len(q0) hold k0, v0 (the other rows random)."""
    rng = np.random.default_rng(b * 1000 + t + s)
    n_q, (kv, h) = q0.shape[0], k0.shape[1:]
    q = rng.standard_normal((b, t, q0.shape[1], h)).astype(np.float32)
    kc = rng.standard_normal((b, kv, s, h)).astype(np.float32)
    vc = rng.standard_normal((b, kv, s, h)).astype(np.float32)
    q[row, :n_q] = q0
    kc[row, :, : k0.shape[0]] = k0.transpose(1, 0, 2)
    vc[row, :, : v0.shape[0]] = v0.transpose(1, 0, 2)
    pos = jnp.full((b,), pos0, jnp.int32)
    fn = tiled_attention if tiled else attention_core
    out = jax.jit(lambda *a: fn(*a, scale=0.125, **kw))(q, kc, vc, pos)
    return np.asarray(out)[row, :n_q]


@pytest.mark.parametrize(
    "kw", [{"sliding_window": None, "softcap": None}, {"sliding_window": 37, "softcap": 20.0}]
)
def test_tiled_prefill_attention_is_the_attention_and_invariant(kw, monkeypatch):
    rng = np.random.default_rng(4)
    pos0, n_q = 150, 40  # a chunk against an existing cache, past a key block boundary
    q0 = rng.standard_normal((n_q, 6, 16)).astype(np.float32)
    k0 = rng.standard_normal((pos0 + n_q, 2, 16)).astype(np.float32)
    v0 = rng.standard_normal((pos0 + n_q, 2, 16)).astype(np.float32)
    want = _attend(1, 48, 256, pos0, q0, k0, v0, 0, **kw)
    monkeypatch.setattr(ops.base, "BATCH_INVARIANT", False)
    ref = _attend(1, 48, 256, pos0, q0, k0, v0, 0, tiled=False, **kw)
    np.testing.assert_allclose(want, ref, rtol=2e-5, atol=2e-6)
    monkeypatch.setattr(ops.base, "BATCH_INVARIANT", True)
    for b, t, s in ((3, 48, 256), (2, 128, 512), (1, 40, 200), (4, 64, 1024)):
        got = _attend(b, t, s, pos0, q0, k0, v0, b - 1, **kw)
        np.testing.assert_array_equal(got, want, err_msg=f"B={b} T={t} S={s}")


def _policy_calls(fmt, policy, b, dtype, chunks, steps=4, s=256):
    """Row 0 of a batch of `b` through calls of `chunks` tokens then `steps` decode
    steps over a `fmt` x `policy` cache (the other rows random): its outputs of every call
    and its cache arrays at the end."""
    from pallax.ir import kvcache
    from pallax.ir.primitives.attention import attention_p, attention_params

    kv, g, h, n = 3, 3, 64, sum(chunks) + steps
    rng, own = np.random.default_rng(b), np.random.default_rng(7)
    x = [rng.standard_normal((b, n, heads, h)).astype(np.float32) for heads in (kv * g, kv, kv)]
    for a in x:
        a[0] = own.standard_normal(a.shape[1:])
    cache = [
        jnp.zeros(tuple({"B": b, "S": s}.get(d, d) for d in shape), dt)
        for shape, dt in kvcache.layer_parts(fmt, policy, kv, h, dtype).values()
    ]
    params = attention_params(x[0], fmt, policy, (10000.0, 1.0), None, None, None)
    call = jax.jit(lambda *a: attention_p.bind(*a, **params))
    outs, pos = [], 0
    for t in (*chunks, *[1] * steps):
        q, k, v = (jnp.asarray(a[:, pos : pos + t], dtype) for a in x)
        res = call(q, k, v, jnp.full((b,), pos, jnp.int32), jnp.full((b,), t, jnp.int32), *cache)
        outs.append(np.asarray(res[0][0].astype(jnp.float32)))
        cache, pos = list(res[1:]), pos + t
    return np.concatenate(outs), [np.asarray(c[0].astype(jnp.float32)) for c in cache]


@pytest.mark.parametrize(
    "fmt,policy,dtype",
    [("dense", "sinks", "bfloat16"), ("int8", "sinks", "float32"),
     ("dense", "h2o", "float32"), ("int8", "h2o", "bfloat16")],
)  # fmt: skip
def test_evicting_cache_attention_is_invariant(fmt, policy, dtype, monkeypatch):
    """The attention over a cache no kernel serves (sinks, H2O; the reference on CPU):
    a row's outputs and cache bits do not depend on its batch-mates and, for a policy
    laid out by position (sinks), on where the prompt's chunks start (the engine's chunks
    are not generate's). Found on an AVX2-only machine, where the one-shot form gave the
    engine other greedy tokens than `generate` for bf16 + sinks and int4 + H2O."""
    from pallax.ir import kvcache

    f = kvcache.FORMATS[fmt]()
    p = kvcache.Sinks(4, 28) if policy == "sinks" else kvcache.H2O(48, 16)
    dt = jnp.dtype(dtype)
    want, cache = _policy_calls(f, p, 1, dt, (64,))
    runs = [(4, (64,))] + ([(1, (40, 24)), (4, (17, 30, 17))] if policy == "sinks" else [])
    for b, chunks in runs:
        out, got = _policy_calls(f, p, b, dt, chunks)
        np.testing.assert_array_equal(out, want, err_msg=f"B={b} chunks {chunks}")
        for x, y in zip(got, cache, strict=True):
            np.testing.assert_array_equal(x, y, err_msg=f"cache, B={b} chunks {chunks}")
    monkeypatch.setattr(ops.base, "BATCH_INVARIANT", False)  # the one-shot reference
    ref, _ = _policy_calls(f, p, 1, dt, (64,))
    tol = 8e-3 if dtype == "bfloat16" else 2e-6  # one bfloat16 ulp in the output
    np.testing.assert_allclose(want, ref, rtol=tol, atol=tol)


# ----------------------------------------------------------------- end to end
def _prefill_logits(compiled, prompts):
    """The first-token logits of each prompt, run as one generate batch would run them."""
    reqs = build_requests(compiled, prompts, max_new_tokens=8)
    b = compiled._buckets(reqs)
    alloc, prefill, _ = compiled._gen_fns(b)
    lens = np.array([len(r.prompt_ids) for r in reqs] + [1] * (b.batch - len(reqs)), np.int32)
    tokens = np.zeros((b.batch, b.chunks * b.prefill), np.int32)
    for i, r in enumerate(reqs):
        tokens[i, : len(r.prompt_ids)] = r.prompt_ids
    assert b.chunks == 1
    last = jnp.asarray(np.clip(lens - 1, -1, b.prefill - 1).astype(np.int32))
    zeros = jnp.zeros((b.batch,), jnp.int32)
    logits, _ = prefill(compiled.weights, alloc(), jnp.asarray(tokens), zeros, last)
    return np.asarray(logits)[: len(prompts)]


@pytest.fixture(scope="module")
def smollm2_blocks(smollm2_gguf_path):
    return pallax.load(smollm2_gguf_path, keep_quantized=True)


# fp32 and the packed formats that quantize their activations (int8, the GGUF file's
# blocks), where a last-bit difference moves the most. bf16 and int4 (~13 s each): their
# matmuls row by row above, their tokens alone and in a changing batch in test_engine.py.
@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["fp32", "int8", "gguf"])
def test_a_prompt_gets_the_same_logits_alone_and_in_a_batch(pipeline, smollm2, smollm2_blocks):
    model = smollm2_blocks if pipeline == "gguf" else smollm2
    c = pallax.compile(model, [] if pipeline in ("fp32", "gguf") else [pipeline])
    together = _prefill_logits(c, PROMPTS)
    for i, p in enumerate(PROMPTS):  # 16-token chunks alone, one 128-token chunk together
        np.testing.assert_array_equal(_prefill_logits(c, [p])[0], together[i], err_msg=p)


@pytest.mark.slow
def test_a_prompt_gets_the_same_text_alone_and_in_a_batch(compiled_fp32):
    """fp32 here; the greedy text alone and among batch-mates in every format is
    test_engine.py's (continuous batching, batches that change every step, against
    generate alone)."""
    c = compiled_fp32
    batch = [o.token_ids for o in c.generate(PROMPTS, max_new_tokens=12)]
    alone = [c.generate([p], max_new_tokens=12)[0].token_ids for p in PROMPTS]
    assert batch == alone
    # a longer cache (S 512, not 256) for the same first tokens
    longer = c.generate([PROMPTS[0]], max_new_tokens=300)[0].token_ids
    assert longer[: len(alone[0])] == alone[0]


@pytest.mark.slow
def test_gemma3_int8_prompt_alone_and_in_a_batch(gemma3):
    """Gemma 3 (sliding-window layers, q/k norms, post-norms) alone in a batch of one.
    XLA:CPU fuses a one-row step of Gemma differently from a batch of two; while it could
    contract multiplies into adds (FMA) that moved its decode logits by ~1e-5 and one of
    these prompts got other int8 tokens alone (4 of 5 equal with PALLAX_XLA_FMA=1), so
    this ran with `min_batch = 2`. With XLA's code kept to AVX it needs no padding row."""
    c = pallax.compile(gemma3, ["int8"])
    assert c.min_batch == 1
    assert c._buckets(build_requests(c, PROMPTS[:1], max_new_tokens=4)).batch == 1
    together = _prefill_logits(c, PROMPTS)
    for i, p in enumerate(PROMPTS):
        np.testing.assert_array_equal(_prefill_logits(c, [p])[0], together[i], err_msg=p)
    # its greedy text alone and among batch-mates: test_engine.py's Gemma 3 int8 test


def test_batch_variant_mode_still_runs_and_stays_close(smollm2, monkeypatch):
    """BATCH_INVARIANT = False (the row-count thresholds) is read when a step is traced:
    a model compiled with it generates, and its prefill logits stay near the invariant
    ones."""
    c = pallax.compile(smollm2)
    want = _prefill_logits(c, PROMPTS[:2])
    monkeypatch.setattr(ops.base, "BATCH_INVARIANT", False)
    c2 = pallax.compile(smollm2)
    got = _prefill_logits(c2, PROMPTS[:2])
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert not np.array_equal(got, want)  # the switch took effect: other forms, other bits
    assert c2.generate(PROMPTS[:1], max_new_tokens=4)[0].token_ids
