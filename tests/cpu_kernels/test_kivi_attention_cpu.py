"""The KIVI decode attention kernel (cpu_kernels/kivi_attention.cc) against the reference
(ir/kvcache/core.reference) for 2, 4 and 8 bits and every slot policy: rows of
different lengths in one batch (the staging ring partly full, granules just encoded or
about to be), a padding row, windows, softcap, every scale dtype; the cache it leaves
equals the reference's, and the model's attention op lowers to it."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax import cpu_kernels
from pallax.cpu_kernels import build, kivi
from pallax.ir import primitives as ops
from pallax.ir.kvcache import FULL, H2O, Kivi, Sinks, core

pytestmark = pytest.mark.usefixtures("kernel")

ROPE = (10000.0, 1.0)
S = 128  # cache rows of the full policy


def _state(fmt, pol, b, kv, h, dtype=jnp.float32):
    def size(d):
        if isinstance(d, int):
            return d
        return {"B": b, "S": S}[d] if "/" not in d else S // int(d[2:])

    return {
        n: jnp.zeros(tuple(size(d) for d in shape), dt)
        for n, (shape, dt) in core.layer_parts(fmt, pol, kv, h, dtype).items()
    }


@functools.cache
def _reference(fmt, pol, window, softcap, scale):
    return jax.jit(functools.partial(core.reference, fmt=fmt, policy=pol, rope=ROPE, scale=scale,
                                     sliding_window=window, softcap=softcap))  # fmt: skip


@functools.cache
def _kernel(fmt, pol, window, softcap, scale, suffix=""):
    def run(q, k, v, pos, valid, state):
        return kivi.kivi_decode(q, k, v, pos, valid, state, fmt, pol, ROPE, scale=scale,
                                sliding_window=window, softcap=softcap, suffix=suffix)  # fmt: skip

    return jax.jit(run)


def _filled(fmt, pol, lengths, n, kv, h, window, softcap, seed, dtype=jnp.float32):
    """The reference's cache (full-precision parts in `dtype`) after a prompt of
    lengths[b] tokens per row, and the next token's q, k, v."""
    rng = np.random.default_rng(seed)
    b, t = len(lengths), max(lengths)

    def f(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return jnp.asarray(x)

    q, k, v = f(b, t, n, h), f(b, t, kv, h), f(b, t, kv, h)
    k = k.at[..., 3].add(4.0)  # an outlier channel, as keys have
    scale = h**-0.5
    _, state = _reference(fmt, pol, window, softcap, scale)(
        q, k, v, jnp.zeros(b, jnp.int32), jnp.asarray(lengths, jnp.int32),
        _state(fmt, pol, b, kv, h, dtype),
    )  # fmt: skip
    return state, (f(b, 1, n, h), f(b, 1, kv, h).at[..., 3].add(4.0), f(b, 1, kv, h))


def _assert_step_matches(fmt, pol, state, new, lengths, valid, window, softcap, h, suffix=""):
    q, k, v = new
    pos, valid = jnp.asarray(lengths, jnp.int32), jnp.asarray(valid, jnp.int32)
    scale = h**-0.5
    want, want_state = _reference(fmt, pol, window, softcap, scale)(q, k, v, pos, valid, state)
    got, got_state = _kernel(fmt, pol, window, softcap, scale, suffix)(q, k, v, pos, valid, state)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    for name, arr in want_state.items():
        if name.startswith("h2o.") and "score" in name:  # the kernel's attention mass
            np.testing.assert_allclose(got_state[name], arr, rtol=1e-4, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(got_state[name], arr, err_msg=name)


# (format, policy, lengths, N, K, H, window, softcap): per row the staging ring empty,
# partly full or one short of releasing a granule; lengths past the first granule and
# at a group boundary; GQA groups 1..4; a window that cuts granules; softcap.
CASES = {
    "kivi2-full": (Kivi(2, 32, 32, "bfloat16", 0), FULL, [1, 40, 63, 95], 9, 3, 64, None, None),
    "kivi4-full-first": (Kivi(4, 16, 16, "float32", 16), FULL, [17, 31, 48, 100], 4, 2, 32, None,
                         30.0),
    "kivi8-full-window": (Kivi(8, 16, 32, "float16", 0), FULL, [120, 57, 64], 8, 2, 32, 37, None),
    "kivi2-h2o": (Kivi(2, 16, 16, "bfloat16", 16), H2O(48, 8), [100, 33, 70], 4, 1, 64, None, None),
    "kivi4-h2o-window": (Kivi(4, 16, 0, "bfloat16", 0), H2O(64, 0), [90, 16, 47], 6, 3, 32, 29,
                         None),
    "kivi2-sinks": (Kivi(2, 32, 32, "bfloat16", 0), Sinks(4, 64), [127, 5, 70], 9, 3, 64, None,
                    None),
    "kivi4-sinks-first": (Kivi(4, 16, 16, "float32", 16), Sinks(4, 40), [100, 20, 66], 4, 2, 32,
                          None, 20.0),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_matches_the_reference(case):
    fmt, pol, lengths, n, kv, h, window, softcap = CASES[case]
    seed = sum(lengths) + n
    state, new = _filled(fmt, pol, lengths, n, kv, h, window, softcap, seed)
    valid = [1] * len(lengths)
    valid[-1] = 0  # a padding row: attends, writes nothing
    _assert_step_matches(fmt, pol, state, new, lengths, valid, window, softcap, h)


@pytest.mark.parametrize("case", ["kivi2-full", "kivi2-h2o", "kivi4-sinks-first"])
def test_bfloat16_cache_matches_the_reference(case):
    """A cache whose full-precision parts are bfloat16 (a bf16 model's): the candidates
    reach the kernel as bfloat16 (float32 under sinks, whose sink keys are rotated)."""
    fmt, pol, lengths, n, kv, h, window, softcap = CASES[case]
    state, new = _filled(fmt, pol, lengths, n, kv, h, window, softcap, 5, jnp.bfloat16)
    assert state["k.res"].dtype == jnp.bfloat16
    _assert_step_matches(fmt, pol, state, new, lengths, [1] * len(lengths), window, softcap, h)


@pytest.mark.parametrize("case", ["kivi2-full", "kivi2-h2o", "kivi2-sinks"])
def test_decode_loop_matches_the_reference(case):
    """Steps across granule boundaries (a granule leaves staging, H2O evicts, the sinks'
    ring wraps), each from the reference's cache."""
    fmt, pol, lengths, n, kv, h, window, softcap = CASES[case]
    state, _ = _filled(fmt, pol, lengths, n, kv, h, window, softcap, 0)
    rng = np.random.default_rng(1)
    steps = 2 * fmt.group_size + 3
    if pol == FULL:
        steps = min(steps, S - max(lengths))
    ref = _reference(fmt, pol, window, softcap, h**-0.5)
    lengths = np.asarray(lengths)
    for _ in range(steps):
        new = tuple(jnp.asarray(rng.standard_normal((len(lengths), 1, x, h)), jnp.float32)
                    for x in (n, kv, kv))  # fmt: skip
        _assert_step_matches(fmt, pol, state, new, lengths, [1] * len(lengths), window, softcap, h)
        _, state = ref(*new, jnp.asarray(lengths, jnp.int32), jnp.ones(len(lengths), jnp.int32),
                       state)  # fmt: skip
        lengths = lengths + 1


def test_empty_cache_and_no_visible_key():
    """Position 0 (only the token itself) and a padding row at position 0 (no key: zeros)."""
    fmt = Kivi(2, 32, 32, "bfloat16", 0)
    n, kv, h = 4, 2, 64
    state = _state(fmt, FULL, 2, kv, h)
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 1, x, h)), jnp.float32) for x in (n, kv, kv))
    pos, valid = jnp.zeros(2, jnp.int32), jnp.asarray([1, 0], jnp.int32)
    want, _ = _reference(fmt, FULL, None, None, 0.125)(q, k, v, pos, valid, state)
    got, _ = _kernel(fmt, FULL, None, None, 0.125)(q, k, v, pos, valid, state)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[1], 0.0)


def test_attention_op_lowers_to_the_kernel():
    fmt, pol, lengths, n, kv, h, window, softcap = CASES["kivi2-h2o"]
    state, (q, k, v) = _filled(fmt, pol, lengths, n, kv, h, window, softcap, 7)
    names = core.part_names(fmt, pol)
    params = ops.attention_params(q, fmt, pol, ROPE, None, window, softcap)
    pos, valid = jnp.asarray(lengths, jnp.int32), jnp.ones(len(lengths), jnp.int32)

    def op(*cache):
        return ops.attention_p.bind(q, k, v, pos, valid, *cache, **params)

    cache = [state[x] for x in names]
    text = jax.jit(op).lower(*cache).as_text()
    assert text.count(f"custom_call @{kivi.TARGET_KIVI}(") == 1
    got = jax.jit(op)(*cache)
    want, want_state = _reference(fmt, pol, window, softcap, params["scale"])(
        q, k, v, pos, valid, state)  # fmt: skip
    np.testing.assert_allclose(got[0], want, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(got[1 + names.index("k.data")], want_state["k.data"])


def test_prefill_keeps_the_reference(monkeypatch):
    fmt = Kivi(2, 32, 32, "bfloat16", 0)
    q = jnp.zeros((1, 4, 4, 64))
    assert cpu_kernels.use_kivi_kernel(q[:, :1], fmt)
    assert not cpu_kernels.use_kivi_kernel(q, fmt)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert not cpu_kernels.use_kivi_kernel(q[:, :1], fmt)


def test_portable_build_matches_the_reference():
    """The scalar code (no AVX2: other CPUs), built without -march=native."""
    flags = ("-O1", "-shared", "-fPIC", "-std=c++17")
    suffix = "_kivi_portable"
    build.register(build.compile_library(flags=flags), suffix=suffix)
    for case in ("kivi2-full", "kivi4-h2o-window", "kivi4-sinks-first"):
        fmt, pol, lengths, n, kv, h, window, softcap = CASES[case]
        state, new = _filled(fmt, pol, lengths, n, kv, h, window, softcap, 11)
        _assert_step_matches(fmt, pol, state, new, lengths, [1] * len(lengths), window, softcap,
                             h, suffix=suffix)  # fmt: skip


def test_the_handler_refuses_results_of_the_wrong_shape():
    """The FFI handler checks its results too: a short `out` or a mass result of the
    wrong shape is an error, not a write out of bounds."""
    b, n, kv, h, s, c = 1, 2, 1, 32, 32, 3
    u8 = lambda *shape: jnp.zeros(shape, jnp.uint8)  # noqa: E731
    f32 = lambda *shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
    args = (f32(b, n, h), u8(b, kv, s, h // 4), f32(b, kv, s // 32, h), f32(b, kv, s // 32, h),
            u8(b, kv, s, h // 4), f32(b, kv, s, 1), f32(b, kv, s, 1),
            jnp.zeros((b, 1, s), jnp.int32), f32(b, kv, c, h), f32(b, kv, c, h),
            jnp.zeros((b, 1, c), jnp.int32))  # fmt: skip
    attrs = dict(bits=np.int64(2), group_size=np.int64(32), scale=np.float32(1.0),
                 softcap=np.float32(0.0))  # fmt: skip

    def call(out_shape, mass_rows, mass_cand, rows=args[1:7]):
        types = [jax.ShapeDtypeStruct(x, jnp.float32) for x in (out_shape, mass_rows, mass_cand)]
        types += [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in rows]  # passed through
        return jax.ffi.ffi_call(kivi.TARGET_KIVI, types)(*args, **attrs)

    out, _, _, *rows = call((b, n, h), (0,), (0,))
    np.testing.assert_array_equal(out, 0.0)  # no visible key
    for got, want in zip(rows, args[1:7], strict=True):  # not aliased here: copied
        np.testing.assert_array_equal(got, want)
    with pytest.raises(Exception, match="passed-through array resized"):
        jax.block_until_ready(call((b, n, h), (0,), (0,), rows=(u8(b, kv, s, 1), *args[2:7])))
    with pytest.raises(Exception, match="candidates must both be f32 or both bf16"):
        mixed = (*args[:9], args[9].astype(jnp.bfloat16), args[10])
        types = [jax.ShapeDtypeStruct(x, jnp.float32) for x in ((b, n, h), (0,), (0,))]
        types += [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args[1:7]]
        jax.block_until_ready(jax.ffi.ffi_call(kivi.TARGET_KIVI, types)(*mixed, **attrs))
    with pytest.raises(Exception, match="out must be"):
        jax.block_until_ready(call((b, n - 1, h), (0,), (0,)))
    with pytest.raises(Exception, match="mass results must be"):
        jax.block_until_ready(call((b, n, h), (b, kv, s), (b, kv, c + 1)))
