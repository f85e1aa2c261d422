"""generate / stream / score on the real model: batching, seeds, stops, long prompts."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import PROMPTS


def test_generate_returns_text_ids_and_reason(compiled_fp32):
    (out,) = compiled_fp32.generate(["The capital of France is"], max_new_tokens=8)
    assert out.text.startswith(" Paris")
    assert len(out.token_ids) == 8 and out.finish_reason == "length"
    assert compiled_fp32.tokenizer.decode(out.token_ids) == out.text


def test_last_timings_count_the_decode_steps(compiled_fp32):
    compiled_fp32.generate(PROMPTS[:3], max_new_tokens=9, ignore_eos=True)
    t = compiled_fp32.last_timings
    assert (t.batch, t.decode_steps) == (3, 8)  # the first token comes from the prefill
    assert t.prefill_s > 0 and t.decode_s > 0
    assert t.decode_tokens_per_s == pytest.approx(3 * 8 / t.decode_s)
    compiled_fp32.generate(["Hi"], max_new_tokens=1)
    assert compiled_fp32.last_timings.decode_steps == 0
    assert compiled_fp32.last_timings.decode_tokens_per_s == 0.0


def test_batch_matches_each_prompt_alone(compiled_fp32):
    """Prompts of different lengths in one batch give the tokens each gives alone."""
    prompts = [PROMPTS[0], PROMPTS[2] + " there lived a very old", PROMPTS[1]]
    batch = compiled_fp32.generate(prompts, max_new_tokens=24, ignore_eos=True)
    for p, b in zip(prompts, batch, strict=True):
        (alone,) = compiled_fp32.generate([p], max_new_tokens=24, ignore_eos=True)
        assert b.token_ids == alone.token_ids, p


def test_seeded_sampling_reproduces(compiled_fp32):
    kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=50, ignore_eos=True)
    a = compiled_fp32.generate([PROMPTS[2]], seed=123, **kw)[0]
    b = compiled_fp32.generate([PROMPTS[2]], seed=123, **kw)[0]
    c = compiled_fp32.generate([PROMPTS[2]], seed=124, **kw)[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    # a seeded row gives the same tokens inside a batch as alone
    batch = compiled_fp32.generate([PROMPTS[0], PROMPTS[2]], seed=[5, 123], **kw)
    assert batch[1].token_ids == a.token_ids


def test_per_request_parameters(compiled_fp32):
    outs = compiled_fp32.generate(PROMPTS[:2], max_new_tokens=[3, 6], ignore_eos=True)
    assert [len(o.token_ids) for o in outs] == [3, 6]


def test_stop_string_cuts_text_and_ids(compiled_fp32):
    (free,) = compiled_fp32.generate([PROMPTS[0]], max_new_tokens=12, ignore_eos=True)
    assert "." in free.text
    (out,) = compiled_fp32.generate([PROMPTS[0]], max_new_tokens=12, stop=["."], ignore_eos=True)
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(".")]
    assert out.token_ids == free.token_ids[: len(out.token_ids)]


def test_stop_token_ids_end_generation(compiled_fp32):
    (free,) = compiled_fp32.generate([PROMPTS[0]], max_new_tokens=8, ignore_eos=True)
    i = next(i for i in range(2, 8) if free.token_ids[i] not in free.token_ids[:i])
    stop_id = free.token_ids[i]
    (out,) = compiled_fp32.generate([PROMPTS[0]], max_new_tokens=8, stop_token_ids=[stop_id])
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: i + 1]


def test_eos_stops_chat_answer(compiled_fp32):
    tok = compiled_fp32.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    (out,) = compiled_fp32.generate([chat], max_new_tokens=64)
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in tok.stop_ids
    assert "4" in out.text and "<|im_end|>" not in out.text


def test_stream_concatenates_to_generate(compiled_fp32):
    pieces = list(compiled_fp32.stream(PROMPTS[1], max_new_tokens=20, ignore_eos=True))
    (out,) = compiled_fp32.generate([PROMPTS[1]], max_new_tokens=20, ignore_eos=True)
    assert len(pieces) > 3
    assert "".join(pieces) == out.text


def test_stream_respects_stop_strings(compiled_fp32):
    text = "".join(compiled_fp32.stream(PROMPTS[0], max_new_tokens=12, stop=["."], ignore_eos=True))
    (out,) = compiled_fp32.generate([PROMPTS[0]], max_new_tokens=12, stop=["."], ignore_eos=True)
    assert text == out.text and "." not in text


def test_long_prompt_uses_chunked_prefill(compiled_fp32):
    """A prompt over the 512-token prefill chunk runs through the cache in chunks."""
    text = " ".join(f"item {i}," for i in range(300))
    ids = compiled_fp32.tokenizer.encode(text)
    assert len(ids) > 600
    (out,) = compiled_fp32.generate([text], max_new_tokens=6, ignore_eos=True)
    lp = compiled_fp32.score(ids + out.token_ids, chunk_size=256)
    # the greedy tokens are the argmax under the scorer, so each has high probability
    assert np.all(lp[-6:] > np.log(0.05)), lp[-6:]


def test_score_is_independent_of_chunk_size(compiled_fp32):
    text = "A journey of a thousand miles begins with a single step. " * 3
    a = compiled_fp32.score(text, chunk_size=8)
    b = compiled_fp32.score(text, chunk_size=64)
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize(
    "prompts, kwargs, exc, match",
    [
        ([""], {}, ValueError, "prompt 0 is empty"),
        ([], {}, ValueError, "non-empty list"),
        (["hi"], dict(max_new_tokens=0), ValueError, "max_new_tokens=0"),
        (["hi"], dict(max_new_tokens=9000), ValueError, "exceeds the context length 8192"),
        (["hi"], dict(temperature=-1.0), ValueError, "temperature=-1.0"),
        (["hi"], dict(top_p=0.0), ValueError, r"top_p=0.0 must be in \(0, 1\]"),
        (["hi"], dict(top_p=1.01), ValueError, "top_p=1.01"),
        (["hi"], dict(top_k=-3), ValueError, "top_k=-3"),
        (["hi"], dict(stop_token_ids=[10**6]), ValueError, "1000000"),
        (["hi", "yo"], dict(seed=[1]), ValueError, "seed has 1 values for 2 prompts"),
        ([[1, 2, 99999]], {}, ValueError, "99999"),
        ([3.5], {}, TypeError, "prompt 0 must be a string or a list of token ids"),
        ([[1.9, 504.7]], {}, TypeError, r"prompt 0 element 0 is 1.9 \(float\)"),
        ([[12, "34"]], {}, TypeError, r"prompt 0 element 1 is '34' \(str\)"),
        ([["12", "34"]], {}, TypeError, r"prompt 0 element 0 is '12'"),
        ([[True, False]], {}, TypeError, r"prompt 0 element 0 is True \(bool\)"),
        ([True, False], {}, TypeError, r"prompt 0 element 0 is True"),
        (["ok", [np.float32(3.0)]], {}, TypeError, r"prompt 1 element 0 is np.float32\(3.0\)"),
        (
            ["ok", "caf\udce9"],
            {},
            ValueError,
            r"prompt 1 is not valid Unicode: byte 0xe9 at "
            r"character 3 \(after 'caf'\)",
        ),
        (
            ["a\ud800b"],
            {},
            ValueError,
            "prompt 0 is not valid Unicode: lone surrogate U\\+D800 at character 1",
        ),
        (["hi"], dict(temperature=True), ValueError, "temperature=True"),
        (["hi"], dict(top_p=True), ValueError, "top_p=True"),
        (["hi"], dict(min_p=False), ValueError, "min_p=False"),
        (["hi"], dict(top_k=2**31), ValueError, r"top_k=2147483648 must be an integer in \[0, "),
        (["hi"], dict(top_k=np.int64(2**40)), ValueError, "top_k=.*1099511627776"),
        (["hi"], dict(ignore_eos="no"), ValueError, "ignore_eos='no' must be True or False"),
        (["hi"], dict(ignore_eos=1), ValueError, "ignore_eos=1 must be True or False"),
        (
            ["hi"],
            dict(temprature=0.5),
            ValueError,
            "generate\\(\\) got an unknown keyword argument 'temprature'; did you mean "
            "'temperature'\\?",
        ),
        (["hi"], dict(stop=["ok", "\ud800"]), ValueError, "stop string 1 is not valid Unicode"),
    ],
)
def test_bad_generate_input(compiled_fp32, prompts, kwargs, exc, match):
    n = len(compiled_fp32._fns)
    with pytest.raises(exc, match=match):
        compiled_fp32.generate(prompts, **kwargs)
    assert len(compiled_fp32._fns) == n  # nothing compiled


def test_unknown_keywords_name_the_method_and_the_closest_argument(compiled_fp32):
    """A misspelt keyword is both a TypeError (as Python raises) and a ValueError."""
    with pytest.raises(TypeError, match=r"stream\(\) got an unknown keyword argument 'topk'; "
                       r"did you mean 'top_k'\?"):  # fmt: skip
        compiled_fp32.stream("hi", topk=3)
    with pytest.raises(ValueError, match="'colour'; its sampling arguments are max_new_tokens,"):
        compiled_fp32.generate("hi", colour="red")


def test_numpy_scalars_are_accepted(compiled_fp32):
    """NumPy scalars are numbers, not coerced: np.float32(0.5) is a temperature."""
    kwargs = dict(max_new_tokens=3, temperature=np.float32(0.5), top_p=np.float64(0.9),
                  top_k=np.int32(40), seed=np.int64(1), ignore_eos=np.bool_(True))  # fmt: skip
    a = compiled_fp32.generate("Hello", **kwargs)[0]
    b = compiled_fp32.generate(np.asarray(compiled_fp32.tokenizer.encode("Hello")), **kwargs)[0]
    assert len(a.token_ids) == 3 and a.token_ids == b.token_ids


def test_prompt_longer_than_context(compiled_fp32):
    ids = [100] * 8192
    with pytest.raises(ValueError, match="8192 tokens; the context length is 8192"):
        compiled_fp32.generate([ids], max_new_tokens=1)
