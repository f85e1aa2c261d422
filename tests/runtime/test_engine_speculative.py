"""Speculative decoding in the engine (issue 17 item 6): prompt-lookup drafts verified with
the decode method give exactly `generate`'s tokens."""

from __future__ import annotations

import pytest

import pallax
from pallax.runtime.engine_steps import prompt_lookup
from tests.runtime.test_engine import SHAPE

TEXT = (
    "The Industrial Revolution began in Great Britain in the late eighteenth century. It "
    "transformed economies that had been based on agriculture and handicrafts into economies "
    "based on large-scale industry, mechanized manufacturing, and the factory system."
)


def _copy_prompt(compiled):
    msgs = [{"role": "user", "content": "Copy this text exactly, word for word:\n\n" + TEXT}]
    return compiled.tokenizer.apply_chat_template(msgs, tokenize=True)


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    assert prompt_lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 3) == [7, 1, 2]  # latest 3-gram
    assert prompt_lookup([5, 6, 1, 2, 4, 8, 2], 2) == [4, 8]  # falls back to a 1-gram
    assert prompt_lookup([1, 2, 3], 4) == [] and prompt_lookup([4], 2) == []


def _check(compiled, k=4, new=40):
    copy = _copy_prompt(compiled)
    prompts = [copy, "Count: 1, 2, 3, 4, 5, 6, 7, 8,", "The capital of France is"]
    with pallax.Engine(compiled, max_batch=4, max_len=512, speculate=k) as eng:
        handles = [eng.submit(p, max_new_tokens=new) for p in prompts]
        sampled = eng.submit(copy, max_new_tokens=8, temperature=0.8, seed=3, ignore_eos=True)
        stopped = eng.submit(copy, max_new_tokens=new, stop=["economies"])
        got = [h.result(timeout=900) for h in handles]
        stats = eng.stats()
        assert len(sampled.result().token_ids) == 8  # sampled, speculatively (see below)
        want_stop = compiled.generate([copy], max_new_tokens=new, stop=["economies"])[0]
        assert stopped.result().token_ids == want_stop.token_ids
        assert stopped.result().text == want_stop.text
    want = [compiled.generate([p], max_new_tokens=new)[0] for p in prompts]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    return stats


def test_speculative_decoding_keeps_the_tokens_of_generate(compiled_fp32):
    stats = _check(compiled_fp32)
    assert stats["accepted_tokens"] > 20  # the copy task takes most of its drafts
    assert stats["drafted_tokens"] >= stats["accepted_tokens"]


# int8 weights with the int8 cache: before the cache had its decode kernel, its XLA
# attention reduced over the whole cache length, so the engine's 512-slot cache and
# generate's shorter one differed in the last bits and a greedy token flipped. (int8
# weights alone, bf16 and the GGUF file's blocks were cases of their own too: "int8,int8kv"
# runs the same int8 weights; bf16's and the GGUF blocks' verification steps take their
# decode kernels, which test_engine.py runs against generate alone; bf16 here took ~35 s.)
@pytest.mark.slow
def test_speculative_decoding_with_int8_weights_and_cache(smollm2):
    compiled = pallax.compile(smollm2, ["int8", "int8kv"])
    assert _check(compiled, new=24)["accepted_tokens"] > 0


@pytest.mark.slow
def test_a_cache_that_cannot_take_back_drafts_decodes_without_them(smollm2):
    """KIVI quantizes tokens as they leave its window: rejected drafts could not be
    overwritten, so the engine runs plain decode steps there."""
    compiled = pallax.compile(smollm2, ["int4", "kivi2"])
    copy = _copy_prompt(compiled)  # the prompt whose drafts the other formats take
    # test_engine.py's int4 + KIVI-2 engine (a 256-token cache: 252 + 4 drafts), so its
    # programs come from the compilation cache
    shape = SHAPE | dict(max_len=SHAPE["max_len"] - 4, speculate=4)
    with pallax.Engine(compiled, **shape) as eng:
        got = eng.submit(copy, max_new_tokens=16).result(timeout=900)
        stats = eng.stats()
    assert "drafted_tokens" not in stats
    assert got.token_ids == compiled.generate([copy], max_new_tokens=16)[0].token_ids


def test_speculate_is_checked(compiled_fp32):
    for bad in (-1, 17, 2.0, True):
        with pytest.raises(ValueError, match="speculate="):
            pallax.Engine(compiled_fp32, speculate=bad)


@pytest.mark.parametrize("top_k", [0, 3])
def test_speculative_sampling_keeps_the_target_distribution(top_k):
    """20,000 rows, one draft sequence [2, 4] against a fixed distribution p: the first
    token is distributed as p, and so is the second among rows whose first is 2."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallax.runtime.engine_steps import speculative_sample
    from pallax.runtime.sampling import SamplingParams, pack

    n, v = 20000, 6
    logits = jnp.log(jnp.asarray([0.1, 0.05, 0.4, 0.15, 0.2, 0.1]))
    params = pack([SamplingParams(temperature=1.0, top_k=top_k, seed=i) for i in range(n)], n)
    rows = jnp.broadcast_to(logits, (n, 3, v))
    drafts = jnp.broadcast_to(jnp.asarray([2, 4], jnp.int32), (n, 2))
    kept, after = jax.jit(speculative_sample)(
        rows, drafts, jnp.full((n,), 2, jnp.int32), params, jnp.full((n,), 5, jnp.int32)
    )
    kept, after = np.asarray(kept), np.asarray(after)
    first = np.where(kept >= 1, 2, after)
    second = np.where(kept >= 2, 4, after)[kept >= 1]
    p = np.exp(np.asarray(logits))
    if top_k:
        p = np.where(p >= np.sort(p)[-top_k], p, 0.0)
    p /= p.sum()
    for got in (first, second):
        freq = np.bincount(got, minlength=v) / len(got)
        np.testing.assert_allclose(freq, p, atol=0.015)


# -------------------------------------------------------------- a draft model
def test_a_draft_model_keeps_the_tokens_of_generate(compiled_fp32, smollm2_gguf_path):
    """The GGUF-native model drafts for the float model dequantized from the same file:
    staggered requests of mixed lengths, a prefix cache hit (the draft prefills what the
    target copied in), a stop string and a sampling request beside them."""
    draft = pallax.compile(pallax.load(smollm2_gguf_path, keep_quantized=True), [])
    copy = _copy_prompt(compiled_fp32)
    prompts = ["The capital of France is", copy, "Explain photosynthesis in simple terms.",
               "Count: 1, 2, 3,", copy]  # fmt: skip
    new = 24
    with pallax.Engine(compiled_fp32, max_batch=3, max_len=256, token_budget=64,
                       speculate=4, draft=draft) as eng:  # fmt: skip
        first = [eng.submit(p, max_new_tokens=new) for p in prompts[:2]]
        first[1].result(timeout=900)  # the copy prompt's pages are cached now
        later = [eng.submit(p, max_new_tokens=new) for p in prompts[2:]]
        sampled = eng.submit(prompts[2], max_new_tokens=8, temperature=0.8, seed=1)
        stopped = eng.submit(copy, max_new_tokens=new, stop=["economies"])
        got = [h.result(timeout=900) for h in first + later]
        assert len(sampled.result(timeout=900).token_ids) <= 8
        want_stop = compiled_fp32.generate([copy], max_new_tokens=new, stop=["economies"])[0]
        assert (stopped.result().token_ids, stopped.result().text) == (
            want_stop.token_ids, want_stop.text)  # fmt: skip
        stats = eng.stats()
    want = [compiled_fp32.generate([p], max_new_tokens=new)[0] for p in prompts]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    assert stats["prefix_hit_tokens"] >= 64
    # the same weights, dequantized or not: nearly every draft is the target's token
    assert stats["accepted_tokens"] >= 0.8 * stats["drafted_tokens"] > 0


def test_a_draft_model_is_checked(compiled_fp32, smollm2, compiled_gemma3):
    with pytest.raises(TypeError, match="draft takes a CompiledModel"):
        pallax.Engine(compiled_fp32, speculate=2, draft=smollm2)
    with pytest.raises(ValueError, match="needs speculate=K >= 1"):
        pallax.Engine(compiled_fp32, draft=compiled_fp32)
    with pytest.raises(ValueError, match="tokenizer"):
        pallax.Engine(compiled_fp32, speculate=2, draft=compiled_gemma3)
    kivi = pallax.compile(smollm2, ["kivi2"])
    with pytest.raises(ValueError, match="draft model's cache .* not rows addressed"):
        pallax.Engine(compiled_fp32, speculate=2, draft=kivi)
    with pytest.raises(ValueError, match="cannot take drafts back"):
        pallax.Engine(kivi, speculate=2, draft=compiled_fp32)
