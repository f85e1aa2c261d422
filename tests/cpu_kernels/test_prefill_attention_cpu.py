"""The flash prefill attention kernel (prefill_attention.cc): against the reference
(`attention_core`, T > 1) over float32 and bfloat16 caches, windows, softcap, GQA groups,
query offsets and partial tiles; a query's bits independent of the chunk it comes in,
its batch-mates and the cache length; the lowering rule choosing it for T > 1 only; the
portable build."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax import cpu_kernels
from pallax.cpu_kernels import build
from pallax.ir import primitives as ops

pytestmark = pytest.mark.usefixtures("kernel")


def _inputs(b, t, n, kv, s, h, pos, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, t, kv, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, kv, h)), jnp.float32)
    kc = jnp.asarray(rng.standard_normal((b, kv, s, h)), dtype)
    vc = jnp.asarray(rng.standard_normal((b, kv, s, h)), dtype)
    return q, k, v, kc, vc, jnp.asarray(pos, jnp.int32)


def _kernel(window, softcap, scale, suffix=""):
    return jax.jit(lambda q, k, v, kc, vc, pos: cpu_kernels._prefill_ffi(
        q, k, v, kc, vc, pos, scale=scale, sliding_window=window, softcap=softcap,
        suffix=suffix))  # fmt: skip


def _reference(window, softcap, scale):
    return jax.jit(lambda q, k, v, kc, vc, pos: ops.dense_attention(
        q, k, v, kc, vc, pos, scale=scale, sliding_window=window, softcap=softcap))  # fmt: skip


CASES = {  # (B, T, N, K, S, H), pos, window, softcap, cache dtype
    "smollm2": ((2, 40, 9, 3, 300, 64), [0, 200], None, None, jnp.float32),
    "gemma-window": ((2, 37, 4, 1, 600, 256), [0, 500], 64, None, jnp.float32),
    "bf16-softcap": ((1, 130, 8, 2, 400, 64), [170], None, 30.0, jnp.bfloat16),
    "mha-tail-lanes": ((3, 17, 2, 2, 150, 40), [0, 5, 133], 100, None, jnp.float32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case):
    shape, pos, window, softcap, dtype = CASES[case]
    b, t, n, kv, s, h = shape
    args = _inputs(b, t, n, kv, s, h, pos, dtype)
    scale = h**-0.5
    got = _kernel(window, softcap, scale)(*args)
    want = _reference(window, softcap, scale)(*args)
    for g, w in zip(got[1:], want[1:], strict=True):  # the same writes
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=2e-5, rtol=2e-5)


def test_a_query_is_independent_of_its_chunk_batch_and_cache():
    """Row 0's tokens 32..95 prefilled as one 64-token chunk, as 16 + 48 tokens, and as
    row 1 of a batch of 3 over a longer cache: the same bits for every query."""
    b, n, kv, h, s = 1, 9, 3, 64, 256
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 64, n, h)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 64, kv, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 64, kv, h)), jnp.float32)
    cache = [jnp.asarray(rng.standard_normal((b, kv, s, h)), jnp.float32) for _ in range(2)]
    run = _kernel(None, None, 0.125)
    whole = run(q, k, v, *cache, jnp.asarray([32], jnp.int32))[0]
    first = run(q[:, :16], k[:, :16], v[:, :16], *cache, jnp.asarray([32], jnp.int32))
    second = run(q[:, 16:], k[:, 16:], v[:, 16:], *first[1:], jnp.asarray([48], jnp.int32))
    split = jnp.concatenate([first[0], second[0]], axis=1)
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(split))
    pad = lambda x, s2: jnp.pad(x, ((1, 1),) + ((0, 0),) * (x.ndim - 1))  # noqa: E731
    big = [jnp.pad(pad(c, 0), ((0, 0), (0, 0), (0, 700), (0, 0))) for c in cache]
    other = jnp.asarray(rng.standard_normal((3, 64, n, h)), jnp.float32)
    qb = other.at[1].set(q[0])
    kb, vb = pad(k, 0), pad(v, 0)
    batched = run(qb, kb, vb, *big, jnp.asarray([900, 32, 0], jnp.int32))[0]
    np.testing.assert_array_equal(np.asarray(whole[0]), np.asarray(batched[1]))


def test_rule_uses_the_kernel_for_chunks_only(monkeypatch):
    q = jnp.zeros((1, 4, 2, 64), jnp.float32)
    cache = jnp.zeros((1, 1, 32, 64), jnp.float32)
    assert cpu_kernels.use_prefill_kernel(q, cache)
    assert not cpu_kernels.use_prefill_kernel(q[:, :1], cache)
    assert not cpu_kernels.use_prefill_kernel(q, cache.astype(jnp.float16))
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert not cpu_kernels.use_prefill_kernel(q, cache)


def test_lowered_prefill_calls_the_kernel():
    args = _inputs(1, 8, 4, 2, 64, 32, [3])

    def attend(q, k, v, kc, vc, pos):
        return ops.attention(q, k, v, kc, vc, pos)

    text = jax.jit(attend).lower(*args).as_text()
    assert cpu_kernels.TARGET_PREFILL in text


def test_portable_build_matches_the_reference():
    """The scalar code (no AVX2: other CPUs), built without -march=native."""
    flags = ("-O1", "-shared", "-fPIC", "-std=c++17")
    suffix = "_prefill_portable"
    build.register(build.compile_library(flags=flags), suffix=suffix)
    for case in ("smollm2", "mha-tail-lanes"):
        shape, pos, window, softcap, dtype = CASES[case]
        b, t, n, kv, s, h = shape
        args = _inputs(b, t, n, kv, s, h, pos, dtype)
        got = _kernel(window, softcap, h**-0.5, suffix)(*args)
        want = _reference(window, softcap, h**-0.5)(*args)
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=2e-5,
                                   rtol=2e-5)  # fmt: skip


@pytest.mark.parametrize("fmt_name", ["int8", "kivi2", "kivi4-window"])
def test_compressed_cache_prefill_matches_reference(fmt_name):
    """A compressed cache with the full policy: two chunks (a 150-token prompt, then 40
    more at a query offset; rows of different lengths, padded tokens) through the rule
    give the reference's output on the real tokens and the very same cache arrays."""
    from pallax.ir import kvcache
    from pallax.ir.kvcache import FULL, Int8, Kivi

    fmt = {"int8": Int8(), "kivi2": Kivi(bits=2, group_size=32, residual=64),
           "kivi4-window": Kivi(bits=4, group_size=32, residual=64)}[fmt_name]  # fmt: skip
    window = 48 if fmt_name.endswith("window") else None
    b, n, kv, h, s = 2, 6, 2, 64, 256
    parts = kvcache.core.layer_parts(fmt, FULL, kv, h, jnp.float32)
    names = kvcache.part_names(fmt, FULL)

    def size(d):  # "B", "S" or "S/g" (per-group arrays)
        if isinstance(d, int):
            return d
        return b if d == "B" else s // int(d[2:]) if d.startswith("S/") else s

    state = [jnp.zeros(tuple(size(d) for d in parts[nm][0]), parts[nm][1]) for nm in names]
    params = dict(format=fmt, policy=FULL, rope=None, scale=h**-0.5, sliding_window=window,
                  softcap=None)  # fmt: skip
    assert cpu_kernels.use_candidate_prefill(jnp.zeros((1, 2, n, h)), fmt, FULL)
    rng = np.random.default_rng(0)
    for t, pos, valid in [(150, [0, 0], [150, 97]), (40, [150, 97], [40, 33])]:
        q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
                   [(b, t, n, h), (b, t, kv, h), (b, t, kv, h)])  # fmt: skip
        args = (q, k, v, jnp.asarray(pos, jnp.int32), jnp.asarray(valid, jnp.int32), *state)
        want = jax.jit(lambda *a: ops.attention_reference(*a, **params))(*args)
        got = jax.jit(lambda *a: cpu_kernels._attention_cpu_rule(*a, **params))(*args)
        for g, w in zip(got[1:], want[1:], strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        real = np.arange(t)[None, :] < np.asarray(valid)[:, None]  # padding rows: unused
        np.testing.assert_allclose(np.asarray(got[0])[real], np.asarray(want[0])[real],
                                   atol=3e-5, rtol=3e-5)  # fmt: skip
        state = list(want[1:])
