"""The CPU quantized matmul (pallax.cpu_kernels): the FFI kernel against two references.

- Exactly emulated: the kernel's own arithmetic in float64 numpy (x quantized to int8 per
  block of 32 with one float32 scale, as the kernel does, then multiplied by the
  dequantized weight). Only float32 rounding separates the two, so this catches any
  layout, tail or threading mistake: atol = BASE_TOL * sqrt(Ip) * |x_q| @ |w|.T.
- The float product x @ dequantize(w).T (ir/qformat.py): the kernel differs by its
  activation quantization, about 0.5% of the output's scale (rms) for these Gaussian
  inputs (theory: a uniform rounding error of amax/254 per element, amax of 32 normals
  being about 2.1 sigma, gives 0.47%). Asserted: rms error <= 0.8% and max error
  <= 5% of the output's rms (measured: 0.55-0.65% and 2.3-3.5%).

Weights come from `qformat.quantize_rtn` (int4 with offsets; symmetric int8 per channel
or per group) or are random values 0..31 with a scale and offset per group (GGUF's Q5
style). x is zero-padded to whole groups as callers do. O = 101 is no multiple of the
kernel's 4-row tiles nor of its per-thread chunks.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax import cpu_kernels
from pallax.cpu_kernels import build
from pallax.ir import qformat

BASE_TOL = 5e-7  # float32 (tokamax's base), times sqrt(reduction length)
REL_RMS_TOL, REL_MAX_TOL = 0.008, 0.05
NUM_OUT = 101


needs_kernel = pytest.mark.usefixtures("kernel")


def _rng(*key):
    return np.random.default_rng([0, *key])


def _random_int8_with_offset(rng, group_size, num_out, num_in):
    """Values 0..31 with a scale and offset per group (GGUF Q5_1 style)."""
    groups = math.ceil(num_in / group_size)
    values = np.clip(np.rint((rng.standard_normal((num_out, num_in)) + 3.0) * 5.0), 0, 31)
    values = qformat.pad_columns(values, group_size).astype(np.int8)
    scale = (1.0 + 0.5 * np.abs(rng.standard_normal((num_out, groups)))) / (16 * math.sqrt(num_in))
    offset = -16.0 * scale * (1.0 + 0.1 * rng.standard_normal((num_out, groups)))
    return qformat.QuantizedWeight(
        jnp.asarray(values),
        jnp.asarray(scale, jnp.float32),
        jnp.asarray(offset, jnp.float32),
        None,
        None,
        8,
        group_size,
        num_in,
    )


def _weight(kind, group_size, num_in):
    rng = _rng(1, num_in, group_size or 0)
    if kind == "int8_offset":
        return _random_int8_with_offset(rng, group_size, NUM_OUT, num_in)
    bits = 4 if kind == "rtn4" else 8
    w = rng.standard_normal((NUM_OUT, num_in), np.float32) / np.float32(math.sqrt(num_in))
    return qformat.quantize_rtn(w, bits, group_size)


def _activations(num_rows, qw):
    x = np.zeros((num_rows, qw.padded_in), np.float32)
    x[:, : qw.in_features] = _rng(2, num_rows).standard_normal((num_rows, qw.in_features))
    return x


def _quantized_activations(x):
    """x [R, Ip] as the kernel sees it: int8 per block of 32, one float32 scale each."""
    rows, ip = x.shape
    blocks = -(-ip // 32)
    xb = np.zeros((rows, blocks * 32), np.float32)
    xb[:, :ip] = x
    xb = xb.reshape(rows, blocks, 32)
    d = np.abs(xb).max(axis=-1) / np.float32(127.0)
    inv = np.where(d != 0, np.float32(1.0) / np.where(d != 0, d, 1), np.float32(0.0))
    q = np.clip(np.rint(xb * inv[..., None]), -127, 127)  # float32 product, ties to even
    return (q.astype(np.float64) * d[..., None]).reshape(rows, -1)[:, :ip]


def _padded_weight(qw, magnitude=False):
    """The float64 matrix [O, Ip] including the zero padding of a partial last group; with
    `magnitude`, |value * scale| + |offset|, the size of the terms the kernel adds up."""
    v = np.asarray(qformat.values(qw), np.float64).reshape(qw.out_features, qw.groups, -1)
    scale = np.asarray(qw.scale, np.float64)[..., None]
    offset = 0.0 if qw.offset is None else np.asarray(qw.offset, np.float64)[..., None]
    w = np.abs(v * scale) + np.abs(offset) if magnitude else v * scale + offset
    return w.reshape(qw.out_features, -1)


def _jitted(qw, kernel=cpu_kernels.qmatmul_cpu):
    return jax.jit(functools.partial(kernel, bits=qw.bits, group_size=qw.group_size))


def _run(x, qw, kernel=cpu_kernels.qmatmul_cpu):
    return np.asarray(_jitted(qw, kernel)(x, qw.data, qw.scale, qw.offset))


def _lowered(x, qw):
    return _jitted(qw).lower(x, qw.data, qw.scale, qw.offset).as_text()


def _assert_matches_emulation(out, x, qw):
    w, magnitude = _padded_weight(qw), _padded_weight(qw, magnitude=True)
    xq = _quantized_activations(x)
    atol = BASE_TOL * math.sqrt(qw.padded_in) * (np.abs(xq) @ magnitude.T)
    ratio = np.abs(out - xq @ w.T) / atol
    worst = np.unravel_index(ratio.argmax(), ratio.shape)
    assert ratio.max() <= 1.0, f"R={x.shape[0]}: error {ratio.max():.2f} x atol at {worst}"


def _assert_close_to_float(out, x, qw):
    expected = x[:, : qw.in_features] @ np.asarray(qformat.dequantize(qw), np.float64).T
    scale = np.sqrt(np.mean(expected**2))
    err = np.abs(out - expected)
    assert np.sqrt(np.mean(err**2)) <= REL_RMS_TOL * scale, np.sqrt(np.mean(err**2)) / scale
    assert err.max() <= REL_MAX_TOL * scale, err.max() / scale


# kind, group_size (None: per channel), I
LAYOUTS = [
    ("rtn4", 32, 576),
    ("rtn4", 32, 80),  # partial last group: Ip = 96
    ("rtn4", 64, 576),
    ("rtn4", 128, 576),  # partial last group: Ip = 640
    ("rtn4", 16, 80),  # Ip = 80: a half block of 16 after the whole ones
    ("rtn8", None, 576),  # per channel (W8A8)
    ("rtn8", None, 100),  # per channel, Ip = 100: a tail of 4
    ("rtn8", 32, 576),  # GGUF Q8_0
    ("rtn8", 16, 80),  # blocks spanning two groups, and a tail of 16
    ("int8_offset", 32, 96),
    ("int8_offset", 16, 80),
    ("int8_offset", 48, 96),  # groups of 48: the second block straddles two
]
ROWS = [1, 2, 7, 64, 300]


def _layout_id(layout):
    kind, group_size, num_in = layout
    return f"{kind}-g{group_size or 'I'}-I{num_in}"


@needs_kernel
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_matches_emulation_and_float(layout):
    qw = _weight(*layout)
    for num_rows in ROWS:
        x = _activations(num_rows, qw)
        out = _run(x, qw)
        assert out.shape == (num_rows, NUM_OUT)
        _assert_matches_emulation(out, x, qw)
        _assert_close_to_float(out, x, qw)


@needs_kernel
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_a_row_is_the_same_bits_alone_and_in_any_batch(layout):
    """Batch invariance at the kernel: every row of calls of 2 to 300 rows (register
    tiles of 4, their 2- and 1-row remainders, several row tiles, threads) equals that
    row computed alone, bit for bit, offsets included (18 groups with g32: the offset
    term's 8-lane part and its scalar tail)."""
    qw = _weight(*layout)
    x = _activations(300, qw)
    jitted = _jitted(qw)
    alone = np.concatenate(
        [np.asarray(jitted(x[r : r + 1], qw.data, qw.scale, qw.offset)) for r in range(9)]
    )
    for rows in (2, 3, 4, 5, 8, 9, 65, 300):
        got = np.asarray(jitted(x[:rows], qw.data, qw.scale, qw.offset))
        n = min(rows, 9)
        np.testing.assert_array_equal(got[:n], alone[:n], err_msg=f"{rows} rows")


@needs_kernel
def test_portable_build_matches_emulation():
    """The scalar code (no AVX2: other CPUs), built without -march=native."""
    flags = ("-O1", "-shared", "-fPIC", "-std=c++17")  # -O1: a quicker compile
    build.register(build.compile_library(flags=flags), suffix="_portable")
    kernel = functools.partial(cpu_kernels._qmatmul_ffi, suffix="_portable")
    for layout in LAYOUTS:
        qw = _weight(*layout)
        x = _activations(7, qw)
        _assert_matches_emulation(_run(x, qw, kernel), x, qw)


@needs_kernel
def test_kernel_is_what_runs():
    qw = _weight("rtn4", 32, 576)
    text = _lowered(_activations(2, qw), qw)
    assert text.count(f"custom_call @{cpu_kernels.TARGET_OFFSET}(") == 1


@needs_kernel
def test_zero_rows_and_zero_input():
    qw = _weight("rtn4", 64, 576)
    out = _run(np.zeros((3, qw.padded_in), np.float32), qw)
    np.testing.assert_array_equal(out, 0.0)


def test_disabled_falls_back_to_xla(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert not cpu_kernels.available()
    for layout in (("rtn4", 128, 576), ("rtn8", None, 100), ("int8_offset", 16, 80)):
        qw = _weight(*layout)
        x = _activations(7, qw)
        assert "custom_call" not in _lowered(x, qw)
        expected = x @ _padded_weight(qw).T
        out = _run(x, qw)
        atol = BASE_TOL * math.sqrt(qw.padded_in) * np.sqrt(np.mean(expected**2))
        np.testing.assert_allclose(out, expected, rtol=BASE_TOL, atol=atol)


def test_unsupported_layout_falls_back_to_xla():
    """int4 groups of 48 split a 32-byte step across groups: XLA computes them."""
    assert not cpu_kernels.supported(4, 48, 2)
    rng = _rng(3)
    data = jnp.asarray(rng.integers(0, 256, (NUM_OUT, 48), np.uint8))
    scale = jnp.asarray(rng.random((NUM_OUT, 2), np.float32))
    qw = qformat.QuantizedWeight(data, scale, -8 * scale, None, None, 4, 48, 96)
    x = _activations(3, qw)
    np.testing.assert_allclose(_run(x, qw), x @ _padded_weight(qw).T, rtol=1e-5, atol=1e-4)


def test_bad_shapes_raise():
    qw = _weight("rtn4", 32, 80)
    with pytest.raises(ValueError, match="zero-padded"):
        cpu_kernels.qmatmul_cpu(
            np.zeros((2, 80), np.float32), qw.data, qw.scale, qw.offset, bits=4, group_size=32
        )
    with pytest.raises(ValueError, match="data"):
        cpu_kernels.qmatmul_cpu(
            np.zeros((2, 96), np.float32), qw.data, qw.scale, qw.offset, bits=8, group_size=32
        )


def test_missing_compiler_warns_and_reports_unavailable(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(build, "_registered", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("PALLAX_CACHE", str(tmp_path))
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    with caplog.at_level(logging.WARNING, logger="pallax.cpu_kernels"):
        assert not cpu_kernels.available()
        assert not cpu_kernels.available()  # decided once: one warning
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no-such-g++" in warnings[0].getMessage()
    qw = _weight("rtn8", 32, 96)
    x = _activations(2, qw)
    np.testing.assert_allclose(_run(x, qw), x @ _padded_weight(qw).T, rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_multi_weight_call_is_each_weights_own_call(rows):
    """One `qmatmul_multi` call (fused projections) over weights of different formats and
    padded widths gives each weight the bits of its own call."""
    num_in = 200
    weights = [_weight("rtn4", 32, num_in), _weight("rtn8", None, num_in),
               _weight("int8_offset", 64, num_in), _weight("rtn4", 128, num_in),
               _weight("rtn8", 32, num_in)]  # fmt: skip
    xs = [_activations(rows, qw) for qw in weights]
    for x in xs[1:]:  # one activation, padded per weight
        np.testing.assert_array_equal(x[:, :num_in], xs[0][:, :num_in])
    arrays = [(qw.data, qw.scale, qw.offset) for qw in weights]

    @jax.jit
    def multi(xs, arrays):
        specs = [(*a, qw.bits, qw.group_size) for a, qw in zip(arrays, weights, strict=True)]
        return cpu_kernels.qmatmul_multi(xs, specs)

    got = multi(xs, arrays)
    assert len(got) == len(weights)
    for x, qw, y in zip(xs, weights, got, strict=True):
        np.testing.assert_array_equal(np.asarray(y), _run(x, qw))
    text = multi.lower(xs, arrays).as_text()
    assert text.count(cpu_kernels.TARGET_MULTI) == 1 and f'{cpu_kernels.TARGET}"' not in text
