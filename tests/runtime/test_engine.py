"""The serving engine (issue 17): continuous batching with chunked prefill gives every
request the tokens `generate` gives it alone, whatever runs beside it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import pallax
from pallax.runtime.engine_handle import EngineClosed
from tests.runtime.test_batch_invariance import PROMPTS  # mixed lengths, one of ~70 tokens

# The engine shape of the format tests (4 slots for 5 prompts, so requests also wait for a
# slot; a 24-token budget, so the long prompt is prefilled in chunks between decode steps,
# of 16 or 32 tokens: two prompt programs per format; 40 tokens took a 64-token one too).
# The prefix-cache tests take it too: their programs then come from the compilation cache
# (another shape cost ~30-60 s of compiles per test on 2 cores).
SHAPE = dict(max_batch=4, token_budget=24, max_len=256)


def _staggered(compiled, prompts, new=12, gap=0.2, **engine):
    """Submit `prompts` one by one while the engine runs (SHAPE unless `engine` says
    otherwise); their results and the engine's counters."""
    with pallax.Engine(compiled, **(SHAPE | engine)) as eng:
        handles = []
        for p in prompts:
            handles.append(eng.submit(p, max_new_tokens=new))
            time.sleep(gap)
        results = [h.result(timeout=900) for h in handles]
        return results, eng.stats()


def _check_equal_to_alone(compiled, prompts=PROMPTS, new=12, chunked=True):
    results, stats = _staggered(compiled, prompts, new)
    alone = [compiled.generate([p], max_new_tokens=new)[0] for p in prompts]
    assert [r.token_ids for r in results] == [a.token_ids for a in alone]
    assert [r.text for r in results] == [a.text for a in alone]
    assert stats["finished"] == len(prompts) and stats["running"] == stats["waiting"] == 0
    if chunked:  # the long prompt took several chunks
        assert stats["prefill_chunks"] > len(prompts)
    else:  # H2O: generate's chunks (its eviction depends on them), one per prompt here
        assert stats["prefill_chunks"] == len(prompts)
    assert stats["prompt_tokens"] == sum(len(r.prompt_token_ids) for r in results)


def test_engine_greedy_equals_generate_alone_fp32(compiled_fp32):
    _check_equal_to_alone(compiled_fp32)


@pytest.fixture(scope="module")
def smollm2_blocks(smollm2_gguf_path):
    return pallax.load(smollm2_gguf_path, keep_quantized=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "pipeline",
    ["cast:bfloat16,evict_kv:sinks:sinks=4:window=28", "int8,int8kv", "int4,kivi2",
     "gguf,evict_kv:h2o:budget=48:recent=16"],
)  # fmt: skip
def test_engine_greedy_equals_generate_alone(pipeline, smollm2, smollm2_blocks):
    """Every weight format (bf16, int8, int4, the GGUF file's blocks) and every cache
    (int8, KIVI-2, H2O, sinks), each weight format paired with one cache: one engine
    each (a compile per format and per cache took ~70 s each; KIVI-2 and H2O with their
    own engines ~55 s more; float32 with the dense cache: the test above)."""
    passes = pipeline.split(",")
    if passes[0] == "gguf":
        compiled = pallax.compile(smollm2_blocks, passes[1:])
    else:
        compiled = pallax.compile(smollm2, passes)
    _check_equal_to_alone(compiled, chunked="h2o" not in pipeline)


@pytest.mark.slow
def test_engine_gemma3_int8_equals_generate_alone(gemma3):
    compiled = pallax.compile(gemma3, ["int8"])
    _check_equal_to_alone(compiled, PROMPTS[2:], new=8)


def test_seeded_sampling_equals_generate_alone(compiled_fp32):
    kw = dict(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95)
    with pallax.Engine(compiled_fp32, max_batch=4, max_len=256) as eng:
        hs = [eng.submit(p, seed=i, **kw) for i, p in enumerate(PROMPTS[:3])]
        greedy = eng.submit(PROMPTS[3], max_new_tokens=6)
        got = [h.result(timeout=600).token_ids for h in hs]
        assert greedy.result(timeout=600).token_ids == (
            compiled_fp32.generate([PROMPTS[3]], max_new_tokens=6)[0].token_ids
        )
    want = [
        compiled_fp32.generate([p], seed=i, **kw)[0].token_ids for i, p in enumerate(PROMPTS[:3])
    ]
    assert got == want


def test_streamed_pieces_make_the_text_and_stop_strings_cut_it(compiled_fp32):
    with pallax.Engine(compiled_fp32, max_batch=2, max_len=256) as eng:
        h = eng.submit(PROMPTS[2], max_new_tokens=24)
        pieces = list(h)
        s = eng.submit(PROMPTS[2], max_new_tokens=24, stop=["return"])
        stopped = "".join(s)
    full = h.result()
    assert len(pieces) > 3 and "".join(pieces) == full.text
    want = compiled_fp32.generate([PROMPTS[2]], max_new_tokens=24, stop=["return"])[0]
    assert stopped == s.result().text == want.text and "return" not in stopped
    assert s.result().token_ids == want.token_ids and s.result().finish_reason == "stop"


def test_a_request_that_stops_mid_batch_leaves_the_others_tokens(compiled_fp32):
    """A decode step is dispatched before the previous step's tokens are read, so a
    request that stops on a stop string has decoded a token more, which nothing reads; a
    waiting request takes its slot (and writes over that token's KV) and a batch-mate
    runs on, each with the tokens `generate` gives it alone."""
    reqs = [(PROMPTS[2], dict(stop=["return"])), (PROMPTS[0], dict(ignore_eos=True)),
            (PROMPTS[1], dict(ignore_eos=True))]  # fmt: skip
    with pallax.Engine(compiled_fp32, max_batch=2, max_len=256) as eng:
        handles = [eng.submit(p, max_new_tokens=24, **k) for p, k in reqs]
        results = [h.result(timeout=600) for h in handles]
    want = [compiled_fp32.generate([p], max_new_tokens=24, **k)[0] for p, k in reqs]
    assert [r.token_ids for r in results] == [w.token_ids for w in want]
    assert results[0].finish_reason == "stop" and len(results[0].token_ids) < 24


def test_async_iteration_streams_concurrent_requests(compiled_fp32):
    async def collect(eng, prompt):
        return "".join([piece async for piece in eng.submit(prompt, max_new_tokens=8)])

    async def main(eng):
        return await asyncio.gather(*(collect(eng, p) for p in PROMPTS[:3]))

    with pallax.Engine(compiled_fp32, max_batch=2, max_len=256) as eng:
        texts = asyncio.run(main(eng))
    assert texts == [o.text for o in compiled_fp32.generate(PROMPTS[:3], max_new_tokens=8)]


def test_cancel_frees_the_slot_and_ends_the_request(compiled_fp32):
    with pallax.Engine(compiled_fp32, max_batch=1, max_len=256) as eng:
        long = eng.submit(PROMPTS[0], max_new_tokens=200, ignore_eos=True)
        waiting = eng.submit(PROMPTS[1], max_new_tokens=4)  # needs the only slot
        first = next(iter(long))
        assert first
        long.cancel()
        res = long.result(timeout=600)
        assert res.finish_reason == "cancelled" and 1 <= len(res.token_ids) < 200
        assert waiting.result(timeout=600).token_ids == (
            compiled_fp32.generate([PROMPTS[1]], max_new_tokens=4)[0].token_ids
        )
        queued = eng.submit(PROMPTS[2], max_new_tokens=200, ignore_eos=True)
        queued.cancel()
        assert queued.result(timeout=600).finish_reason == "cancelled"
        stats = eng.stats()
    assert stats["cancelled"] == 2 and stats["finished"] == 1


def test_decodes_keep_running_while_a_long_prompt_is_prefilled(compiled_fp32):
    """SARATHI: a 300-token prompt arriving mid-run is prefilled in budget-sized chunks
    between decode steps, so the running request keeps getting a token every step."""
    long_prompt = list(range(1000, 1300))
    with pallax.Engine(compiled_fp32, max_batch=2, token_budget=40, max_len=512) as eng:
        short = eng.submit(PROMPTS[0], max_new_tokens=40, ignore_eos=True)
        while not short.token_times:
            time.sleep(0.01)
        before = eng.stats()["steps"]
        late = eng.submit(long_prompt, max_new_tokens=2)
        late.result(timeout=600)
        first_late = late.token_times[0]
        during = [t for t in short.token_times if t < first_late]
        steps = eng.stats()["steps"]
        short.result(timeout=600)
    chunks = -(-300 // (40 - 1))
    assert steps - before >= chunks  # at most 39 prompt tokens beside one decode per step
    assert len(during) >= chunks  # and the short request got its token in each of them


def test_engine_refuses_bad_arguments(compiled_fp32, smollm2):
    E = pallax.Engine
    for kw, match in [
        (dict(max_batch=0), "max_batch=0"),
        (dict(max_batch="8"), "max_batch='8'"),
        (dict(max_batch=4, token_budget=10), "token_budget=10 must be at least max_batch"),
        (dict(max_len=10**6), "max_len=1000000 is longer than the context length"),
        (dict(max_len=1.5), "max_len=1.5"),
    ]:
        with pytest.raises(ValueError, match=match):
            E(compiled_fp32, **kw)
    with pytest.raises(TypeError, match="Engine takes a CompiledModel"):
        E(smollm2)
    with E(compiled_fp32, max_batch=1, max_len=64) as eng:
        with pytest.raises(ValueError, match="exceeds this engine's max_len=64"):
            eng.submit(PROMPTS[0], max_new_tokens=60)
        with pytest.raises(TypeError, match="unknown keyword argument 'temprature'"):
            eng.submit(PROMPTS[0], temprature=0.5)
        with pytest.raises(ValueError, match="temperature=-1"):
            eng.submit(PROMPTS[0], temperature=-1)
        with pytest.raises(ValueError, match="submit takes one prompt"):
            eng.submit([PROMPTS[0], PROMPTS[1]])
        with pytest.raises(ValueError, match="empty"):
            eng.submit("")
    with pytest.raises(EngineClosed):
        eng.submit(PROMPTS[0])
    assert not [t for t in threading.enumerate() if t.name == "pallax-engine" and t.is_alive()]


def _shared_prefix_prompts(n, prefix_len=200, tail=20):
    import numpy as np

    rng = np.random.default_rng(5)
    prefix = rng.integers(100, 30000, prefix_len).tolist()
    return [prefix + rng.integers(100, 30000, tail).tolist() for _ in range(n)]


def test_prefix_cache_hits_skip_prefill_and_keep_the_tokens(compiled_fp32):
    """Prompts sharing a 200-token prefix: the second and third copy its three full
    64-token pages from the pool and prefill only the rest (in chunks), and get generate's
    tokens. (The pool copies every array of the cache's layout, as the layout test below
    shows; int8 weights with an int8 cache here besides took ~20 s. Prefix hits on int8
    weights: test_artifact_engine.py; beside a draft model: test_engine_speculative.py.)"""
    prompts = _shared_prefix_prompts(3)
    with pallax.Engine(compiled_fp32, **SHAPE) as eng:
        got = [eng.submit(p, max_new_tokens=6).result(timeout=600).token_ids for p in prompts]
        stats = eng.stats()
    assert got == [compiled_fp32.generate([p], max_new_tokens=6)[0].token_ids for p in prompts]
    assert stats["prefix_hit_tokens"] == 2 * 192
    assert stats["prompt_tokens"] == 3 * 220 - 2 * 192


def test_prefix_cache_is_off_where_the_cache_is_not_addressed_by_position(smollm2):
    from pallax.runtime import prefix_cache

    layout = lambda passes: pallax.compile(smollm2, passes).pipeline_graph().cache  # noqa: E731
    assert prefix_cache.supported(layout([])) and prefix_cache.supported(layout(["int8kv"]))
    for passes in (["kivi2"], ["evict_kv:h2o:budget=48"], ["evict_kv:sinks"]):
        assert not prefix_cache.supported(layout(passes)), passes
    # the int4 + KIVI-2 format test's engine: its programs come from the compilation cache
    with pallax.Engine(pallax.compile(smollm2, ["int4", "kivi2"]), **SHAPE) as eng:
        prompts = _shared_prefix_prompts(2)
        for p in prompts:
            eng.submit(p, max_new_tokens=2).result(timeout=600)
        assert "prefix_hit_tokens" not in eng.stats()


def test_prefix_pool_evicts_least_recently_used_pages_and_their_descendants():
    import jax.numpy as jnp

    from pallax.ir.graph import CacheLayout
    from pallax.runtime.prefix_cache import PrefixCache

    # values [B, kv, S, D] and, as int8's cache has, a scale per row [B, kv, S]
    layout = CacheLayout((("k", ("B", 1, "S", 2), "int8"), ("s", ("B", 1, "S"), "float32")))
    pool = PrefixCache(layout, pages=3, page=4, seq=16)
    cache = {"k": jnp.arange(2 * 16 * 2, dtype=jnp.int8).reshape(2, 1, 16, 2),
             "s": jnp.arange(2 * 16, dtype=jnp.float32).reshape(2, 1, 16) + 1}  # fmt: skip
    a, b = list(range(9)), [50 + i for i in range(9)]
    assert pool.insert(a, cache, 1) == 2 and pool.lookup(a) == pool.lookup(a + [7])[:2]
    empty = {k: jnp.zeros_like(v) for k, v in cache.items()}
    loaded = pool.load(empty, 0, pool.lookup(a))
    for k in cache:  # the slot's rows, copied
        assert (loaded[k][0, :, :8] == cache[k][1, :, :8]).all(), k
        assert (loaded[k][0, :, 8:] == 0).all() and (loaded[k][1] == 0).all(), k
    assert pool.insert(b, cache, 0) == 2  # one free page, then a's LRU first page goes,
    assert pool.lookup(a) == [] and len(pool.lookup(b)) == 2  # and its child with it
    assert pool.lookup(a[:4] + [99]) == []  # a's first page went too
    assert len(pool.lookup(b[:8])) == 1  # a prompt of whole pages keeps one to prefill


@pytest.mark.slow
def test_engine_runs_a_sharded_model(smollm2):
    """tensor 2 x data 2 over the session's virtual CPU devices (tests/conftest.py): the
    slot cache is split by batch and KV heads, and requests keep generate's tokens."""
    import jax

    from pallax.passes import shard

    assert len(jax.devices()) >= 4, (
        f"{len(jax.devices())} devices: tests/conftest.py sets "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts; an XLA_FLAGS "
        "of your own must include it"
    )
    compiled = pallax.compile(smollm2, ["int8", shard(tensor=2, data=2)])
    with pytest.raises(ValueError, match="max_batch=3 must be a multiple of data=2"):
        pallax.Engine(compiled, max_batch=3)
    _check_equal_to_alone(compiled, PROMPTS[2:], new=8)
