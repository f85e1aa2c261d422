"""scripts/eval_ppl.py: every token scored once, over windows through the compiled graph."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pallax.scripts import eval_ppl


class _Positions:
    """A stand-in whose score() returns each target's position in the text, plus its
    context length as the fraction, so the test sees which window scored it."""

    def __init__(self, n):
        self.ids = list(range(n))

    def score(self, ids, chunk_size):
        return np.asarray([ids[i] + i / 1000 for i in range(1, len(ids))], np.float64)


@pytest.mark.parametrize("n, window, stride", [(10, 4, 2), (679, 512, 256), (5, 8, 4), (9, 3, 1)])
def test_each_token_scored_once_with_enough_context(n, window, stride):
    fake = _Positions(n)
    got = eval_ppl.window_log_probs(fake, fake.ids, window, stride, 16)
    assert np.array_equal(np.floor(got).astype(int), np.arange(1, n))
    context = np.round((got % 1) * 1000).astype(int)
    first_window = context[: window - 1]
    assert (context[window - 1 :] >= window - stride).all() and len(first_window) == min(
        window - 1, n - 1
    )


def test_one_window_equals_score(compiled_fp32):
    text = eval_ppl.DEFAULT_TEXT.read_text(encoding="utf-8")[:600]
    ids = compiled_fp32.tokenizer.encode(text)
    want = math.exp(-float(np.mean(compiled_fp32.score(text))))
    got = eval_ppl.perplexity(compiled_fp32, text, window=len(ids), stride=len(ids) // 2)
    assert got == pytest.approx(want, rel=1e-5)


def test_cli(capsys, smollm2_gguf_path):
    rc = eval_ppl.main(["--model", str(smollm2_gguf_path), "--window", "256", "--stride", "128"])
    out = capsys.readouterr().out
    assert rc == 0 and "ppl" in out and "+0.00%" in out
    ppl = float(out.splitlines()[1].split("ppl")[1].split("|")[0])
    assert 5 < ppl < 60  # SmolLM2 on plain English prose


def test_kept_quantization_and_agreement(capsys, smollm2_gguf_path, tmp_path):
    """The GGUF's own Q4_1 blocks score like the float load of the same file, and greedy
    agreement of a pipeline with itself is total. The blocks multiply in the CPU kernel at
    every row count (batch invariance), which quantizes activations per 32-block as
    llama.cpp does: measured 2.2613 against 2.2652 here (0.17%), so within 1%."""
    text = tmp_path / "t.txt"
    text.write_text("The river bends twice before it reaches the sea. " * 12, encoding="utf-8")
    argv = ["--model", str(smollm2_gguf_path), "--file", str(text), "--window", "128",
            "--stride", "64", "--passes", "none", "gguf", "--agreement", "4"]  # fmt: skip
    assert eval_ppl.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    ppl = [float(line.split("ppl")[1].split("|")[0]) for line in lines]
    assert abs(ppl[1] / ppl[0] - 1) < 0.01
    assert all("8/8 identical" in line for line in lines) or all(
        "1/1 identical" in line for line in lines
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--window", "1"], "--window 1 must be in"),
        (["--stride", "600"], "--stride 600 must be in"),
        (["--passes", "quantize_weights:3"], "bits=3 is not supported"),
        (["--file", "/nonexistent/text.txt"], "nonexistent"),
        (["--agreement", "-1"], "--agreement -1 must be >= 0"),
        (["--agreement", "4", "--prompt-len", "0"], "--prompt-len 0 must be in"),
    ],
)
def test_bad_input(capsys, smollm2_gguf_path, argv, message):
    assert eval_ppl.main(["--model", str(smollm2_gguf_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_genres_each_on_its_own_line(capsys, smollm2_gguf_path, monkeypatch, tmp_path):
    """--genres scores every file of data/eval_genres/ (here two small stand-ins) and
    reports each genre on its own line, with its change against the first pipeline."""
    texts = [("alpha", "The tide came in over the flats at noon. " * 8),
             ("beta", "Clause 4.2: the Licensee shall not sublicense. " * 8)]  # fmt: skip
    for name, text in texts:
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "LICENSE.txt").write_text("not a genre", encoding="utf-8")
    monkeypatch.setattr(eval_ppl, "GENRES", tmp_path)
    argv = ["--model", str(smollm2_gguf_path), "--genres", "--window", "64", "--stride", "32",
            "--passes", "none", "quantize_weights:8"]  # fmt: skip
    assert eval_ppl.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "2 texts" in lines[0] and len(lines) == 5
    assert [line.split("|")[1].strip() for line in lines[1:]] == ["alpha", "beta"] * 2
    assert all("+0.00%" in line for line in lines[1:3])


def test_genres_ship_with_pallax():
    assert {f.stem for f in eval_ppl.genre_files()} >= {"poetry", "legal", "medical", "sports"}
