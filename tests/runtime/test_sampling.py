"""Sampling on device: greedy, temperature, top-k, top-p, min-p, seeds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax.runtime.sampling import SamplingParams, pack
from pallax.runtime.sampling import sample as _sample

sample = jax.jit(_sample)

LOGITS = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.07, 0.03]], jnp.float32))


def _draw(params: SamplingParams, n=2000, logits=LOGITS):
    p = pack([params], 1)
    draw = jax.jit(jax.vmap(lambda i: _sample(logits, p, i)[0]))
    out = np.asarray(draw(jnp.arange(n, dtype=jnp.int32)))
    return np.bincount(out, minlength=logits.shape[-1]) / n


def test_greedy_is_argmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 100)), jnp.float32)
    got = sample(logits, pack([SamplingParams()] * 4, 4), jnp.int32(0))
    np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(logits), -1))


def test_greedy_takes_the_first_maximum_and_the_first_nan():
    from pallax.runtime.sampling import greedy

    logits = jnp.asarray(
        [[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [1.0, jnp.nan, 4.0, jnp.nan],
         [-jnp.inf, -jnp.inf, -1.0, -jnp.inf], [jnp.inf, 0.0, jnp.inf, 1.0]]
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(jax.jit(greedy)(logits)), [1, 0, 1, 2, 0])
    np.testing.assert_array_equal(np.asarray(greedy(logits)), np.asarray(jnp.argmax(logits, -1)))


def test_temperature_one_follows_softmax():
    freq = _draw(SamplingParams(temperature=1.0, seed=0))
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.07, 0.03], atol=0.04)


def test_top_k_keeps_k_most_likely():
    freq = _draw(SamplingParams(temperature=1.0, top_k=2, seed=1), n=600)
    assert freq[2:].sum() == 0
    np.testing.assert_allclose(freq[:2], [2 / 3, 1 / 3], atol=0.07)


def test_top_p_keeps_smallest_nucleus():
    freq = _draw(SamplingParams(temperature=1.0, top_p=0.7, seed=2), n=600)
    assert freq[2:].sum() == 0  # 0.5 + 0.25 >= 0.7
    assert freq[1] > 0.15


def test_min_p_drops_tokens_below_fraction_of_top():
    freq = _draw(SamplingParams(temperature=1.0, min_p=0.25, seed=3), n=600)
    assert freq[3:].sum() == 0  # 0.07 < 0.25 * 0.5
    assert freq[2] > 0.05


def test_seeds_reproduce_and_differ():
    a = _draw(SamplingParams(temperature=1.0, seed=7), n=50)
    b = _draw(SamplingParams(temperature=1.0, seed=7), n=50)
    np.testing.assert_array_equal(a, b)
    p = pack([SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=1.0, seed=8)], 2)
    logits = jnp.zeros((2, 1000), jnp.float32)
    rows = np.stack([np.asarray(sample(logits, p, jnp.int32(i))) for i in range(20)])
    assert not np.array_equal(rows[:, 0], rows[:, 1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), "temperature=-0.5"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(top_k=2.5), "top_k=2.5"),
        (dict(min_p=2.0), "min_p=2.0"),
        (dict(seed="x"), "seed='x'"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
