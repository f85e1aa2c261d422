"""Lazy weights (`pallax.load(..., lazy=True)`): read from the mapped file where placed,
equal to the eager load wherever they are read, and read whole by pipelines that do not
place them lazily. Sharded placement (each device and process reading its slices) is
tested on 8 devices and 2 processes in tests/sharding."""

from __future__ import annotations

import numpy as np
import pytest

import pallax
from pallax.ir.lazy import LazyWeight
from pallax.sharding.heads import _gather


@pytest.fixture(scope="module")
def lazy_smollm2(smollm2_gguf_path):
    return pallax.load(smollm2_gguf_path, lazy=True)


def test_every_weight_reads_as_the_eager_load(lazy_smollm2, smollm2):
    """Q4_1 and Q8_0 blocks, float32 norms, llama.cpp's Q/K row order undone lazily."""
    assert sorted(lazy_smollm2.weights) == sorted(smollm2.weights)
    for name, w in lazy_smollm2.weights.items():
        assert isinstance(w, LazyWeight) and w.shape == smollm2.weights[name].shape, name
        np.testing.assert_array_equal(w.read(), np.asarray(smollm2.weights[name]), err_msg=name)


def test_slices_read_only_what_they_cover(lazy_smollm2, smollm2):
    for name in ("layers.0.wq", "layers.3.wk", "layers.1.w_down", "embed"):
        w, want = lazy_smollm2.weights[name], np.asarray(smollm2.weights[name])
        before = w.reads[0]
        index = (slice(5, 40), slice(33, 300))  # rows and columns not on block boundaries
        np.testing.assert_array_equal(w.read(index), want[index], err_msg=name)
        assert w.reads[0] - before == 35 * 267, name  # what was asked, not the whole weight
        rows = np.array([7, 2, 30])
        np.testing.assert_array_equal(w.read((rows, slice(None))), want[rows], err_msg=name)


def test_superblocks_are_read_by_the_blocks_that_cover_a_slice(gemma3_gguf_path, gemma3):
    """Gemma 3's Q4_K / Q6_K tensors: blocks of 256 inputs, a slice starting mid-block."""
    lazy = pallax.load(gemma3_gguf_path, lazy=True)
    for name in ("layers.0.wq", "layers.0.w_down", "layers.5.w_up", "embed"):
        want = np.asarray(gemma3.weights[name])
        index = (slice(3, 19), slice(100, 700))
        np.testing.assert_array_equal(lazy.weights[name].read(index), want[index], err_msg=name)


def test_gather_and_astype_match_their_eager_forms(lazy_smollm2, smollm2):
    w, want = lazy_smollm2.weights["layers.0.wk"], np.asarray(smollm2.weights["layers.0.wk"])
    index = (2, -1, 0, 1, -1, 2)  # heads of 64 rows, -1: a head of zeros
    gathered = w.gather(index, 0, 64)
    np.testing.assert_array_equal(gathered.read(), np.asarray(_gather(want, index, 0, 64)))
    np.testing.assert_array_equal(gathered.read((slice(60, 200), slice(0, 9))),
                                  np.asarray(_gather(want, index, 0, 64))[60:200, :9])  # fmt: skip
    bf16 = w.astype("bfloat16")
    assert bf16.read().dtype.name == "bfloat16"
    np.testing.assert_array_equal(bf16.read(), want.astype(bf16.dtype))


def test_pipelines_that_do_not_place_lazily_read_the_weights_whole(lazy_smollm2, smollm2):
    prompts = ["The capital of France is", "def fib(n):"]
    for passes in ([], ["int8"], ["cast:bfloat16"]):
        want = pallax.compile(smollm2, passes).generate(prompts, max_new_tokens=6)
        got = pallax.compile(lazy_smollm2, passes).generate(prompts, max_new_tokens=6)
        assert [r.text for r in got] == [r.text for r in want], passes


def test_lazy_refuses_what_it_cannot_read(smollm2_gguf_path):
    with pytest.raises(ValueError, match="lazy=True .* does not combine with keep_quantized"):
        pallax.load(smollm2_gguf_path, lazy=True, keep_quantized=True)
    with pytest.raises(ValueError, match="does not combine with abstract"):
        pallax.load(smollm2_gguf_path, lazy=True, abstract=True)
    with pytest.raises(ValueError, match="lazy='yes' must be True or False"):
        pallax.load(smollm2_gguf_path, lazy="yes")


def test_edge_reads_and_saving_a_lazy_model(lazy_smollm2, smollm2, tmp_path):
    w, want = lazy_smollm2.weights["layers.0.w_up"], np.asarray(smollm2.weights["layers.0.w_up"])
    assert w.read((slice(3, 3), slice(32, 32))).shape == (0, 0)  # empty, at a block edge
    np.testing.assert_array_equal(w.read((np.array([-1, 0]), slice(0, 64))), want[[-1, 0], :64])
    with pytest.raises(IndexError, match="out of range"):
        w.read((np.array([w.shape[0]]), slice(None)))
    from pallax.runtime.checkpoint import save_checkpoint

    save_checkpoint(lazy_smollm2, tmp_path / "ckpt")  # read whole to be saved
    loaded = pallax.load(tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(loaded.weights["layers.0.w_up"]), want)
