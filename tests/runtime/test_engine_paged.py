"""The engine's paged KV cache (issue 17 item 4): block tables over a pool of pages,
prefix pages shared by reference, and preemption that swaps a request's pages out and
back, so every request still gets the tokens `generate` gives it alone."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallax
from pallax.ir.kvcache import DENSE, FULL
from pallax.runtime import kv_pages, page_pool
from pallax.runtime.engine_steps import EngineShape
from tests.runtime.test_batch_invariance import PROMPTS
from tests.runtime.test_engine import SHAPE, _staggered  # 4 slots, budget 24, max_len 256

LONG = PROMPTS[3]  # ~70 tokens: four full pages of 16
# five requests of 6-77 prompt tokens and 40 new ones: ~29 pages of 16 at once, more than
# the 16 or 18 of the engines below, so requests are preempted and resumed
MIXED = [LONG, "Tell me a story about a dragon. " + LONG, PROMPTS[0] + " " + LONG[:120],
         LONG + " Summarize it.", PROMPTS[1]]  # fmt: skip
H2O = "evict_kv:h2o:budget=64:recent=16"


# ---------------------------------------------------------------- the rule itself
def _toy_inner(eqn, q, k, v, pos, valid, k_cache, v_cache):
    """A position-addressed cache op: writes k's and v's T rows at pos .. pos + T - 1 and
    returns the sum of each row's keys up to its last position (what it "attends" over)."""
    b, t = k.shape[:2]
    at = pos[:, None] + jnp.arange(t)[None, :]
    rows = jnp.arange(b)[:, None]
    k_cache = k_cache.at[rows, :, at].set(k, mode="drop")  # [B, kv, S, H]
    v_cache = v_cache.at[rows, :, at].set(v, mode="drop")
    seen = jnp.arange(k_cache.shape[2])[None, :] < (pos + t)[:, None]
    out = jnp.sum(jnp.where(seen[:, None, :, None], k_cache, 0.0), axis=2)
    return [out, k_cache, v_cache]


def test_paged_rule_gathers_and_writes_back_like_a_slot_cache():
    page, n, pool_pages, b, kv, h = 4, 5, 12, 3, 2, 3
    rng = np.random.default_rng(0)
    slot = jnp.asarray(rng.normal(size=(b, kv, n * page, h)), jnp.float32)
    # row 0 holds pages 3, 7, 1; row 1 pages 0, 2 (3 unheld); row 2 none (a free slot)
    table = np.full((b, n), pool_pages, np.int32)
    table[0, :3], table[1, :2] = [3, 7, 1], [0, 2]
    pool = jnp.zeros((pool_pages, kv, page, h), jnp.float32)
    for r in range(b):
        for j in range(n):
            if table[r, j] < pool_pages:
                pool = pool.at[table[r, j]].set(slot[r, :, j * page : (j + 1) * page])
    k = jnp.asarray(rng.normal(size=(b, 3, kv, h)), jnp.float32)
    pos = jnp.asarray([5, 6, 0], jnp.int32)  # row 1 writes its positions 6, 7, then 8 (unheld)
    rule = kv_pages.paged_rule(jnp.asarray(table), page, _toy_inner)
    dense = types.SimpleNamespace(params={"format": DENSE, "policy": FULL})  # one k, one v
    out, new_pool, new_v = rule(dense, k, k, 2 * k, pos, None, pool, pool)
    ref_out, ref_slot, ref_v = _toy_inner(None, k, k, 2 * k, pos, None, slot, slot)
    held = table < pool_pages
    # rows read what they hold and the call's own rows; other rows of unheld pages zeros
    at = np.arange(n * page)[None, :]
    written = (at >= np.asarray(pos)[:, None]) & (at < np.asarray(pos)[:, None] + 3)
    read = np.repeat(held, page, axis=1) | written
    visible = read[:, None, :, None] * np.asarray(ref_slot)
    seen = at < (np.asarray(pos) + 3)[:, None]
    np.testing.assert_allclose(out, np.sum(visible * seen[:, None, :, None], axis=2), rtol=1e-6)
    for r in range(2):
        for j in range(n):
            if held[r, j]:  # every held page equals the slot cache's after the call
                rows = slice(j * page, (j + 1) * page)
                np.testing.assert_array_equal(new_pool[table[r, j]], ref_slot[r, :, rows])
                np.testing.assert_array_equal(new_v[table[r, j]], ref_v[r, :, rows])
    unheld = np.asarray(sorted(set(range(pool_pages)) - set(table[held].tolist())))
    np.testing.assert_array_equal(new_pool[unheld], 0.0)  # writes dropped
    np.testing.assert_array_equal(new_v[unheld], 0.0)
    np.testing.assert_allclose(ref_out[0], out[0], rtol=1e-6)  # row 0 holds all it reads


# ---------------------------------------------------------- the host's bookkeeping
class _Req:
    def __init__(self, ids):
        self.prompt_ids = ids


class _Live:
    def __init__(self, slot, ids):
        self.slot, self.req, self.saved, self.prefilled = slot, _Req(ids), None, 0


def test_pages_are_counted_shared_and_evicted():
    kv = page_pool.PagedKV(pages=8, page=4, longest=16, rows=3, per_row=4)
    a = _Live(0, list(range(10)))  # 2 full pages and 2 tokens
    assert kv.fits(a) and kv.admit(a, share=True) == 0 and kv.held[0] == 3
    kv.insert(0, a.req.prompt_ids)  # its two full pages go to the prefix cache
    assert kv.refs[kv.table[0, :3]].tolist() == [2, 2, 1]
    kv.release(0)
    assert kv.used() == 2 and kv.available() == 8  # cached, but evictable
    b = _Live(1, list(range(8)) + [99, 98, 97])
    assert kv.admit(b, share=True) == 8  # both cached pages, by reference
    assert kv.held[1] == 3 and kv.used() == 3
    assert kv.reserve(2, 40) and kv.held[2] == 4  # capped at `longest` tokens
    assert kv.available() == 1
    c = _Live(0, [5] * 9)
    assert not kv.fits(c)  # 3 pages needed, 1 free
    assert not kv.reserve(0, 12) and kv.held[0] == 0  # nothing taken
    kv.release(1)  # the cached pages are evictable again: LRU makes room
    assert kv.available() == 4 and kv.reserve(0, 12) and kv.used() == 8
    # the least recently used cached page (the first) went, and with it the chain
    assert kv.share(1, list(range(9))) == 0 and kv.held[1] == 0
    held = kv.table[kv.table < 8]
    assert len(held) == 7 and len(set(held.tolist())) == 7  # no page held twice


def test_a_swapped_out_request_gets_its_bits_back():
    kv = page_pool.PagedKV(pages=6, page=2, longest=8, rows=2, per_row=4)
    pool = {"k": jnp.arange(6 * 3 * 2 * 5, dtype=jnp.float32).reshape(6, 3, 2, 5),
            "s": jnp.arange(6 * 3 * 2, dtype=jnp.float32).reshape(6, 3, 2)}  # fmt: skip
    assert kv.reserve(0, 5)
    before = {k: np.asarray(v)[kv.table[0, :3]] for k, v in pool.items()}
    live = _Live(0, [1, 2, 3, 4, 5])
    live.saved = kv.swap_out(pool, 0)
    assert kv.held[0] == 0 and kv.used() == 0 and live.saved[1] == 3
    assert kv.reserve(1, 2)  # another request takes a page meanwhile
    live.slot = 0
    assert kv.fits(live) and kv.admit(live, share=True) == 0
    pool = kv.restore(pool, 0, live.saved)
    for k in pool:
        np.testing.assert_array_equal(np.asarray(pool[k])[kv.table[0, :3]], before[k])


# -------------------------------------------------------------------- the engine
def _alone(compiled, prompts, new):
    return [compiled.generate([p], max_new_tokens=new)[0].token_ids for p in prompts]


@pytest.mark.slow
def test_paged_engine_preempts_and_shares_prefixes_fp32(compiled_fp32):
    results, stats = _staggered(compiled_fp32, MIXED, 40, gap=0.0, kv_pages=16)
    assert [r.token_ids for r in results] == _alone(compiled_fp32, MIXED, 40)
    assert stats["preempted"] >= 1 and stats["finished"] == len(MIXED)
    assert stats["kv_pages"] == 16 and stats["running"] == stats["waiting"] == 0
    # one after another: the later prompts find the first one's four full pages
    seq = [LONG, LONG + " Summarize it.", LONG + " Translate it into French."]
    with pallax.Engine(compiled_fp32, **SHAPE, kv_pages=64) as eng:
        got = [eng.submit(p, max_new_tokens=8).result(timeout=900) for p in seq]
        stats = eng.stats()
    assert stats["prefix_hit_tokens"] == 2 * 64
    assert [r.token_ids for r in got] == _alone(compiled_fp32, seq, 8)


@pytest.mark.slow
def test_paged_int8_cache_with_speculation_preempts(smollm2):
    compiled = pallax.compile(smollm2, passes=["int8", "int8kv"])
    results, stats = _staggered(compiled, MIXED, 40, gap=0.3, kv_pages=18, speculate=3)
    assert [r.token_ids for r in results] == _alone(compiled, MIXED, 40)
    assert stats["preempted"] >= 1 and stats["drafted_tokens"] > 0


@pytest.mark.slow
def test_paged_kivi_cache_preempts(smollm2):
    """KIVI-2 over pages of 32 (its packed rows and per-token scales by position, its key
    scales by group) with its staging ring per slot: prompts of ~150 tokens and 40 new
    ones, so groups leave the 160-slot ring into pages, and 10 pages for ~24 wanted."""
    compiled = pallax.compile(smollm2, passes=["kivi2"])
    prompts = [LONG + " " + LONG, "Once upon a time. " + LONG + " " + LONG, PROMPTS[0],
               LONG + " And then? " + LONG]  # fmt: skip
    results, stats = _staggered(compiled, prompts, 40, gap=0.3, kv_pages=10)
    assert [r.token_ids for r in results] == _alone(compiled, prompts, 40)
    assert stats["preempted"] >= 1 and stats["prefix_hit_tokens"] == 0  # no prefix pages


def test_kv_pages_bad_values_are_refused_by_name(compiled_fp32, smollm2):
    cases = [
        (dict(kv_pages=15), "kv_pages=15 must be at least 16"),
        (dict(kv_pages=16, speculate=2), "kv_pages=16 must be at least 17"),
        (dict(kv_pages=0), "kv_pages=0 must be an integer >= 1"),
        (dict(kv_pages=True), "kv_pages=True must be an integer"),
        (dict(kv_pages=64, page_size=48), "page_size=48 must divide"),
        (dict(kv_pages=64, page_size=0), "page_size=0 must be an integer >= 1"),
        (dict(page_size=16), "page_size=16 needs kv_pages="),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            pallax.Engine(compiled_fp32, **(SHAPE | kwargs))
    kivi = pallax.compile(smollm2, passes=["kivi2"])
    with pytest.raises(ValueError, match="page_size=16 must be a multiple of the kivi cache's "
                       "granule of 32 tokens"):  # fmt: skip
        pallax.Engine(kivi, **SHAPE, kv_pages=64, page_size=16)
    h2o = pallax.compile(smollm2, passes=[H2O])
    with pytest.raises(ValueError, match="kv_pages= needs a cache of rows addressed by position"):
        pallax.Engine(h2o, **SHAPE, kv_pages=64)


def test_memory_report_says_what_pages_a_budget_buys(smollm2, compiled_fp32):
    dense = compiled_fp32.memory_report(2**30)
    assert dense["kv_bytes_per_page"] == 16 * dense["kv_bytes_per_token"]
    free = 2**30 - dense["weight_bytes"]
    assert dense["kv_pages"] == free // dense["kv_bytes_per_page"]
    int8 = pallax.compile(smollm2, passes=["int8kv"]).memory_report(2**30, page_size=64)
    assert int8["kv_bytes_per_page"] == 64 * int8["kv_bytes_per_token"]
    assert int8["kv_pages"] * 64 > dense["kv_pages"] * 16  # smaller rows: more tokens
    kivi = pallax.compile(smollm2, passes=["kivi2"]).memory_report(2**30)
    assert kivi["kv_page_size"] == 32  # its group
    assert kivi["kv_bytes_per_page"] == 32 * kivi["kv_bytes_per_token"]
    assert kivi["kv_pages"] * 32 > int8["kv_pages"] * 64
    h2o = pallax.compile(smollm2, passes=[H2O]).memory_report(2**30)
    assert h2o["kv_bytes_per_page"] is None and "kv_pages" not in h2o


def _attention_eqn(compiled):
    from pallax.ir import primitives as ops

    shape = EngineShape.plan(**SHAPE, context=compiled.config.context_length)
    graph = compiled.slot_steps(shape).decode()[0]
    return next(
        e for e in graph.steps["prefill"].jaxpr.jaxpr.eqns if e.primitive is ops.attention_p
    )


def test_paged_decode_takes_the_paged_kernel_on_tpu_and_cuda(compiled_fp32):
    """SmolLM2's dense decode over pages: the kernel branch (interpret mode) gives the
    gathered path's output and pools, and the rule lowers to the kernel on tpu and cuda."""
    from jax import export

    eqn = _attention_eqn(compiled_fp32)
    (b, _, heads, h), kv = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape[2]
    page, n, pages = 16, 4, 3 * b
    rng = np.random.default_rng(1)
    table = np.full((b, n), pages, np.int32)  # row 0 holds three pages, the others two
    order = rng.permutation(pages)
    table[0, :3] = order[:3]
    table[1:, :2] = order[3 : 3 + 2 * (b - 1)].reshape(b - 1, 2)
    table = jnp.asarray(table)
    f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    args = (f32(b, 1, heads, h), f32(b, 1, kv, h), f32(b, 1, kv, h),
            jnp.asarray([40] + [25] * (b - 1), jnp.int32), jnp.ones((b,), jnp.int32),
            f32(pages, kv, page, h), f32(pages, kv, page, h))  # fmt: skip
    rule = kv_pages.paged_rule(table, page)
    want = jax.jit(lambda *a: rule(eqn, *a))(*args)  # on CPU: the gathered path
    for platform in ("tpu", "cuda"):
        got = kv_pages.kernel_branch(eqn, table, page, platform, interpret=True)(*args)
        np.testing.assert_allclose(got[0], want[0], atol=2e-6, rtol=1e-5)
        for g, w in zip(got[1:], want[1:], strict=True):
            np.testing.assert_array_equal(g, w)
        checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        text = export.export(jax.jit(lambda *a: rule(eqn, *a)), platforms=[platform],
                             disabled_checks=checks)(*args).mlir_module()  # fmt: skip
        assert "paged_decode_attention" in text
