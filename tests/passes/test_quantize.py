"""quantize_weights: the packed format, the qlinear / qembed ops, before/after on the graph,
calibration (outliers, GPTQ) and bad input."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import pallax
from pallax.ir import primitives as ops
from pallax.ir import qformat
from pallax.ir.qformat import QuantizedWeight

CALIB = ["A short calibration text: the river bends twice before it reaches the sea. " * 6]


def _w8a8(x, qw):
    xs = np.abs(x).max(-1, keepdims=True) / 127
    xq = np.clip(np.rint(x / xs), -127, 127)
    return (xq @ np.asarray(qw.data, np.float64).T) * xs * np.asarray(qw.scale)[:, 0]


def _reference(x, qw):
    return ops.qlinear_reference(
        jnp.asarray(x), qw.data, qw.scale, bits=qw.bits, group_size=qw.group_size,
        in_features=qw.in_features, offset=False, outliers=False,
    )  # fmt: skip


@pytest.mark.parametrize("rows", [1, 3, 8, 64, 100])
@pytest.mark.parametrize("invariant", [True, False])
def test_qlinear_per_channel_is_w8a8(rows, invariant, monkeypatch):
    """In XLA ops: decode steps' rows (one token per sequence) compute W8A8 at every row
    count (padded GEMV, plain, transposed: the same math), prefill chunks multiply the
    dequantized weight. Batch-variant, the row count decides instead (> 64: dequantized)."""
    monkeypatch.setattr(ops.base, "BATCH_INVARIANT", invariant)
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 64)).astype(np.float32) * 3
    w = rng.standard_normal((48, 64)).astype(np.float32)
    qw = qformat.quantize_rtn(w, 8)
    deq = np.asarray(qformat.dequantize(qw))
    if invariant:  # the same rows as one prompt's chunk: weight-only
        chunk = np.asarray(_reference(x[None], qw))[0]
        want = x @ deq.T if rows > 1 else _w8a8(x, qw)
        np.testing.assert_allclose(chunk, want, rtol=1e-5, atol=1e-4)
    got = np.asarray(_reference(x, qw))
    want = _w8a8(x, qw) if invariant or rows <= ops.SKINNY_ROWS else x @ deq.T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got, x @ w.T, atol=0.05 * np.abs(x @ w.T).max())


@pytest.mark.parametrize("bits,group,d_in", [(4, 32, 80), (4, 64, 128), (4, 128, 96), (8, 32, 80)])
@pytest.mark.parametrize("rows", [1, 5])
def test_qlinear_groups_are_dequantize_then_dot(bits, group, d_in, rows):
    """Group formats (including a partial last group) multiply by exactly dequantize(w)."""
    rng = np.random.default_rng(bits * group + rows)
    x = rng.standard_normal((rows, d_in)).astype(np.float32)
    w = rng.standard_normal((40, d_in)).astype(np.float32)
    qw = qformat.quantize_rtn(w, bits, group)
    qformat.check(qw)
    assert qw.data.shape == (40, -(-d_in // group) * group // (2 if bits == 4 else 1))
    deq = np.asarray(qformat.dequantize(qw))
    got = np.asarray(ops.qlinear(jnp.asarray(x), qw))
    np.testing.assert_allclose(got, x @ deq.T, rtol=1e-5, atol=1e-4)
    if bits == 8:  # round to nearest on the channel's grid
        assert np.abs(deq - w).max() <= 0.5 * np.asarray(qw.scale).max() + 1e-6
    else:  # the range search never does worse than the plain min/max grid
        pad = qformat.pad_columns(w, group).reshape(40, -1, group)
        real = (np.arange(pad.shape[1] * group) < d_in).reshape(pad.shape[1], group)
        lo = np.where(real, pad, np.inf).min(-1)
        hi = np.where(real, pad, -np.inf).max(-1)
        s, o = qformat.int4_params(lo, hi)
        q = np.clip(np.rint((pad - o[..., None]) / s[..., None]), 0, 15)
        plain = (np.square(q * s[..., None] + o[..., None] - pad) * real).sum()
        assert np.square(deq - w).sum() <= plain * (1 + 1e-5)


def test_int4_packing_layout_and_exact_grid():
    """Byte k of a group holds feature k (low nibble) and k + g/2 (high nibble); weights already
    on a 4-bit grid per group (a GGUF Q4_1 model) are reproduced exactly."""
    vals = np.arange(32, dtype=np.uint8).reshape(1, 32) % 16
    packed = qformat.pack_int4(vals, 32)
    assert packed[0, 0] == (vals[0, 0] | vals[0, 16] << 4)
    np.testing.assert_array_equal(qformat.unpack_int4(packed, 32), vals)
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (8, 64))
    q[:, 0], q[:, 32], q[:, 1], q[:, 33] = 0, 0, 15, 15
    w = (q * 0.03 - 0.2).astype(np.float32)
    np.testing.assert_allclose(np.asarray(qformat.dequantize(qformat.quantize_rtn(w, 4, 32))), w,
                               atol=1e-6)  # fmt: skip


def test_outlier_decomposition_op():
    """Outlier features go through float32; the rest through W8A8 with a row scale that no
    longer sees the outliers, so the error on the regular features shrinks."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[:, [3, 40]] *= 200.0
    w = rng.standard_normal((32, 64)).astype(np.float32)
    idx = np.array([3, 40], np.int32)
    regular = w.copy()
    regular[:, idx] = 0
    plain = qformat.quantize_rtn(w, 8)
    q = qformat.quantize_rtn(regular, 8)
    q = QuantizedWeight(q.data, q.scale, None, jnp.asarray(idx), jnp.asarray(w[:, idx]), 8, 64, 64)
    qformat.check(q)
    got = np.asarray(ops.qlinear(jnp.asarray(x), q))
    x_reg = x.copy()
    x_reg[:, idx] = 0
    np.testing.assert_allclose(got, _w8a8(x_reg, q) + x[:, idx] @ w[:, idx].T, rtol=1e-5,
                               atol=1e-3)  # fmt: skip
    exact = x @ w.T
    err_with = np.abs(got - exact).max()
    err_without = np.abs(np.asarray(ops.qlinear(jnp.asarray(x), plain)) - exact).max()
    assert err_with < 0.2 * err_without


def test_qembed_gathers_dequantized_rows():
    rng = np.random.default_rng(2)
    table = rng.standard_normal((50, 96)).astype(np.float32)
    ids = jnp.asarray([[0, 7, 49], [3, 3, 1]], jnp.int32)
    for bits, g in [(8, None), (4, 32)]:
        q = qformat.quantize_rtn(table, bits, g)
        got = np.asarray(ops.qembed(ids, q, scale=2.0, dtype=jnp.bfloat16).astype(jnp.float32))
        want = np.asarray(qformat.dequantize(q))[np.asarray(ids)] * 2.0
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    # a table with outlier columns (LLM.int8() on a tied head): the embedding restores them
    idx = np.array([5, 60], np.int32)
    regular = table.copy()
    regular[:, idx] = 0
    q = qformat.quantize_rtn(regular, 8)
    q = QuantizedWeight(q.data, q.scale, None, jnp.asarray(idx), jnp.asarray(table[:, idx]),
                        8, 96, 96)  # fmt: skip
    got = np.asarray(ops.qembed(ids, q, dtype=jnp.float32))
    np.testing.assert_allclose(got, np.asarray(qformat.dequantize(q))[np.asarray(ids)], atol=1e-6)
    np.testing.assert_array_equal(got[..., idx], table[np.asarray(ids)][..., idx])


# ------------------------------------------------------------------- on the real model
def test_int8_pass_rewrites_every_linear(smollm2, compiled_fp32):
    compiled = pallax.compile(smollm2, passes=["int8"])
    before, after = compiled_fp32.pipeline_graph(), compiled.pipeline_graph()
    text = compiled.graph("decode")
    n_linear = 7 * smollm2.config.n_layers
    assert text.count("qlinear[bits=8") == n_linear and " linear " not in text
    quantized = [k for k, w in after.weights.items() if isinstance(w, QuantizedWeight)]
    assert len(quantized) == n_linear and "embed" not in quantized
    assert all(after.weights[k].per_channel for k in quantized)
    assert after.weight_bytes() < 0.6 * before.weight_bytes()
    assert after.meta["weights"] == "int8"
    out = compiled.generate(["The capital of France is"], max_new_tokens=8)[0]
    assert "Paris" in out.text


def test_int4_pass_packs_groups_and_quantizes_head(smollm2, compiled_fp32, monkeypatch):
    """int4 g64 with the (tied) table quantized too: embed -> qembed, lm_head -> qlinear."""
    p = pallax.passes.quantize_weights(4, group_size=64, embeddings=True, head=True)
    exact = pallax.compile(smollm2, passes=["quantize_weights:4:group_size=32"])
    compiled = pallax.compile(smollm2, passes=[p])
    g = compiled.pipeline_graph()
    wq = g.weights["layers.0.wq"]
    assert wq.bits == 4 and wq.data.dtype == jnp.uint8 and wq.data.shape == (576, 288)
    assert wq.scale.shape == (576, 9) and wq.offset is not None
    assert isinstance(g.weights["embed"], QuantizedWeight)
    text = compiled.graph("decode")
    assert "qembed" in text and "lm_head" not in text and " embed[" not in text
    assert "qlinear[bits=4, group_size=64" in text
    ratio = g.weight_bytes() / compiled_fp32.pipeline_graph().weight_bytes()
    assert ratio < 0.2, ratio
    text_in = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
    ref, got = compiled_fp32.score(text_in), compiled.score(text_in)
    print("int4 g64 + head: mean |delta logprob|", np.abs(ref - got).mean())
    assert np.abs(ref - got).mean() < 1.2  # measured 0.89: RTN int4 g64 with an int4 head is lossy
    # SmolLM2's weights come from a Q4_1 file (int4, g32, min/max grid): RTN at g32 keeps them.
    # (Exactly so in the XLA lowering; the CPU kernel also quantizes the activations.)
    monkeypatch.setenv("PALLAX_CPU_KERNELS", "0")
    np.testing.assert_allclose(exact.score(text_in), ref, atol=2e-3)


def _eval_text(chars=1200):
    from pallax.scripts.eval_ppl import DEFAULT_TEXT

    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        return f.read()[:chars]


def _calibration(chars=3000):
    from pallax.passes.calibrate import DEFAULT_DIR

    with open(f"{DEFAULT_DIR}/mixed.txt", encoding="utf-8") as f:
        return [f.read()[:chars]]


def test_outliers_bring_int8_back_to_fp32(smollm2, compiled_fp32, monkeypatch):
    """LLM.int8()'s decomposition, with outlier features found on calibration text: the
    activations feeding w_down have features in the hundreds, which per-row int8 cannot hold.
    Checked on the vector-wise W8A8 path (XLA, decode-sized 32-row chunks, CPU kernel off).
    Measured: mean |delta logprob| 0.186 without, 0.117 with (this test's texts). The CPU
    kernel's per-32 activation blocks already localize outliers (0.070 / 0.058), and prefill
    (> 64 rows) multiplies the dequantized weight (0.048 / 0.041). Batch-variant, where a
    32-token chunk takes the W8A8 path (batch-invariant it is a prefill chunk: weight-only)."""
    monkeypatch.setenv("PALLAX_CPU_KERNELS", "0")
    monkeypatch.setattr(ops.base, "BATCH_INVARIANT", False)
    text = _eval_text()
    plain = pallax.compile(smollm2, passes=["int8"])
    p = pallax.passes.quantize_weights(8, outlier_threshold=6.0, calibration=_calibration())
    decomposed = pallax.compile(smollm2, passes=[p])
    g = decomposed.pipeline_graph()
    n_out = {k: w.outlier_idx.shape[0] / w.in_features for k, w in g.weights.items()
             if isinstance(w, QuantizedWeight) and w.outlier_idx is not None}  # fmt: skip
    assert any("w_down" in k for k in n_out) and max(n_out.values()) <= 0.25
    ref = compiled_fp32.score(text, chunk_size=32)
    err_plain = np.abs(plain.score(text, chunk_size=32) - ref).mean()
    err_dec = np.abs(decomposed.score(text, chunk_size=32) - ref).mean()
    assert err_dec < 0.75 * err_plain, (err_dec, err_plain)
    assert "calibration=<1 items" in next(
        d for d in g.meta["passes"] if d.startswith("quantize_weights")
    )


@pytest.mark.slow
def test_gptq_beats_rtn_on_held_out_genres(smollm2):
    """int4 g128 (partial last groups on SmolLM2's 576 features), GPTQ with the default
    calibration (eight genres, data/calibration/) and its dampening chosen per weight on
    held-out calibration data, against round to nearest: perplexity on every genre of
    data/eval_genres/ (poetry, legal, medical, science paper, sports, period letters: no
    calibration text is of these genres): lower on data/eval_text.txt and on the genres'
    mean log-perplexity, and never more than 4% higher on one genre.
    Measured (scripts/eval_ppl.py --genres), AVX-512 VM: RTN / GPTQ legal 17.84 / 17.21,
    letters 43.45 / 40.64, medical 21.11 / 20.66, poetry 35.36 / 34.23, science
    19.08 / 17.44, sports 47.66 / 44.02 (fp32 12.11, 32.80, 16.11, 28.07, 14.04, 34.67):
    lower on every genre. On an AVX2-only VM (other float rounding in the calibration's
    BLAS and in the int4 kernel) medical was 21.18 / 21.80: GPTQ lost by 2.9% there, so
    "every genre" (issue 18 item 1) does not hold on every CPU yet and is left open."""
    from pallax.scripts import eval_ppl

    rtn = pallax.compile(smollm2, passes=[pallax.passes.quantize_weights(4, group_size=128)])
    p = pallax.passes.quantize_weights(4, group_size=128, method="gptq")
    gptq = pallax.compile(smollm2, passes=[p])
    w = gptq.pipeline_graph().weights["layers.3.w_up"]
    assert (w.bits, w.group_size, w.groups, w.in_features) == (4, 128, 5, 576)
    assert len(p.choices) == 7 * smollm2.config.n_layers
    files = [*eval_ppl.genre_files(), eval_ppl.DEFAULT_TEXT]
    assert len(files) >= 5
    ppl = {}
    for f in files:
        text = f.read_text(encoding="utf-8")
        # a 512-token chunk per window: the same values as 128 (the kernels are invariant
        # to how rows are chunked), ~20% sooner
        ppl[f.stem] = tuple(eval_ppl.perplexity(c, text, 512, 256, 512) for c in (rtn, gptq))
    a, b = ppl.pop(eval_ppl.DEFAULT_TEXT.stem)
    assert b < a, (a, b)
    logs = np.log(np.array(list(ppl.values())))
    assert logs[:, 1].mean() < logs[:, 0].mean(), ppl
    assert all(b < 1.04 * a for a, b in ppl.values()), ppl


def test_gptq_damp_option():
    """damp= fixes GPTQ's dampening (no held-out selection); bad values are refused."""
    p = pallax.passes.parse_pass("quantize_weights:4:method=gptq:damp=0.1")
    assert p.damp == 0.1 and "damp=0.1" in p.label()
    for bad in (0, -1, True, "x", 1000):
        with pytest.raises(ValueError, match=f"damp={bad!r} must be a number in"):
            pallax.passes.quantize_weights(4, method="gptq", damp=bad)
    with pytest.raises(ValueError, match="damp=0.1 is GPTQ's; method='rtn'"):
        pallax.passes.quantize_weights(4, damp=0.1)


def test_bad_input(smollm2):
    qw = pallax.passes.quantize_weights
    with pytest.raises(ValueError, match=r"bits=3 is not supported; allowed: \(4, 8\)"):
        qw(3)
    allowed = r"allowed: \(32, 64, 128\)"
    with pytest.raises(ValueError, match=r"group_size=100 is not supported; " + allowed):
        qw(4, group_size=100)
    with pytest.raises(ValueError, match="method='awq'"):
        qw(4, method="awq")
    with pytest.raises(ValueError, match="calibration is empty"):
        qw(4, method="gptq", calibration=[])
    with pytest.raises(ValueError, match="would ignore it"):
        qw(4, calibration=["some text"])
    with pytest.raises(ValueError, match="applies to bits=8 per output channel"):
        qw(4, outlier_threshold=6.0)
    with pytest.raises(ValueError, match="outlier_threshold=-1"):
        qw(8, outlier_threshold=-1)
    with pytest.raises(ValueError, match=r"calibration\[0\] must be a string or a 1-D array"):
        qw(4, method="gptq", calibration=[np.zeros((2, 3), np.int32)])
    with pytest.raises(ValueError, match="bits='eight' is not an integer"):
        pallax.compile(smollm2, passes=["quantize_weights:eight"])
    with pytest.raises(ValueError, match=r"pass 1 \(quantize_weights\) requires float weights"):
        pallax.compile(smollm2, passes=["int8", "int4"])
    with pytest.raises(ValueError, match="unexpected keyword argument 'bogus'"):
        pallax.compile(smollm2, passes=["quantize_weights:4:bogus=1"])
    with pytest.raises(ValueError, match=r"table_bits=2 is not supported; allowed: \(4, 8\)"):
        qw(4, head=True, table_bits=2)
    with pytest.raises(ValueError, match="only quantized with embeddings=True or head=True"):
        qw(4, table_bits=8)
    with pytest.raises(ValueError, match="table_bits=4 tables cannot keep outlier columns"):
        qw(8, outlier_threshold=6.0, head=True, table_bits=4)


def test_table_bits_keep_an_int8_head_under_int4_linears(smollm2, compiled_fp32):
    """Before: a float head; after int4 g32 with table_bits=8: int4 linears, the tied table
    int8 per channel for both the embedding and the head, scoring close to fp32."""
    before = compiled_fp32.pipeline_graph()
    assert not isinstance(before.weights["embed"], QuantizedWeight)
    p = pallax.passes.parse_pass("quantize_weights:4:group_size=32:head=true:table_bits=8")
    assert (p.bits, p.head, p.table_bits) == (4, True, 8)
    compiled = pallax.compile(smollm2, passes=[p])
    g = compiled.pipeline_graph()
    assert g.weights["layers.0.wq"].bits == 4 and g.weights["layers.0.wq"].group_size == 32
    table = g.weights["embed"]
    assert isinstance(table, QuantizedWeight) and table.bits == 8 and table.scale.shape[1] == 1
    text = compiled.graph("decode")
    assert "qlinear[bits=4, group_size=32" in text and "qembed[bits=8" in text
    assert "lm_head" not in text
    assert g.meta["weights"] == "int4 g32 (tables int8)"
    text_in = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
    ref, got = compiled_fp32.score(text_in), compiled.score(text_in)
    print("int4 g32 + int8 table: mean |delta logprob|", np.abs(ref - got).mean())
    assert np.abs(ref - got).mean() < 0.2  # measured 0.11; an int4 g64 table: 0.89 (above)


def test_pass_strings_parse_keywords():
    p = pallax.passes.parse_pass("quantize_weights:4:group_size=64:method=gptq")
    assert (p.bits, p.group_size, p.method) == (4, 64, "gptq")
    assert pallax.passes.parse_pass("int8-outliers").outlier_threshold == 6.0
