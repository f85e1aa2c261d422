"""Calibration data: the default genres, how the batch is cut, the held-out split."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pallax.passes import calibrate
from pallax.scripts import eval_ppl


class _Chars:
    """A tokenizer stand-in: one token per character (code point mod 1000)."""

    def encode(self, text):
        return [ord(c) % 1000 for c in text]


def test_default_calibration_is_every_genre_file_and_licensed():
    names = sorted(n for n in os.listdir(calibrate.DEFAULT_DIR) if n.endswith(".txt"))
    texts = calibrate.default_calibration()
    assert "LICENSE.txt" in names and len(texts) == len(names) - 1 >= 8
    license_text = open(os.path.join(calibrate.DEFAULT_DIR, "LICENSE.txt")).read()
    assert "CC0" in license_text
    for n in names:
        if n != "LICENSE.txt":
            assert n in license_text, n
    assert all(len(t) > 5000 for t in texts)


def test_eval_genres_are_not_calibration_text():
    files = eval_ppl.genre_files()
    assert len(files) >= 4 and all(f.name != "LICENSE.txt" for f in files)
    calib = "\n".join(calibrate.default_calibration())
    for f in files:
        lines = [x for x in f.read_text(encoding="utf-8").splitlines() if len(x) > 40]
        assert lines and not any(x in calib for x in lines), f.name


def test_batch_keeps_every_part_when_over_budget(monkeypatch):
    """Past MAX_TOKENS, evenly spaced sequences are kept (not the first ones only)."""
    monkeypatch.setattr(calibrate, "MAX_TOKENS", 40)
    items = ("a" * 40, "b" * 40, "c" * 40, "d" * 40)
    batch = calibrate.calibration_batch(items, _Chars(), 1000, 10)
    assert batch.shape == (4, 10)
    assert [chr(t) for t in batch[:, 0]] == ["a", "b", "c", "d"]
    small = calibrate.calibration_batch(("xyz",), _Chars(), 1000, 10)
    assert small.shape == (1, 3)


@pytest.mark.parametrize(
    "n, t, want",
    [
        (8, 4, [s == 3 or s == 7 for s in range(8) for _ in range(4)]),
        (2, 8, [p >= 6 for _ in range(2) for p in range(8)]),
        (1, 7, [False] * 7),  # too short to split
    ],
)
def test_held_out_rows(n, t, want):
    assert calibrate.held_out_rows(n, t).tolist() == want


def test_held_out_rows_cover_a_quarter():
    held = calibrate.held_out_rows(32, 256)
    assert held.mean() == 0.25
    assert np.array_equal(held.reshape(32, 256).all(1), np.arange(32) % 4 == 3)
