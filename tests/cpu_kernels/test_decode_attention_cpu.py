"""The decode attention kernel (cpu_kernels/attention.cc) and the XLA rule it replaces:
both against the plain math (write k, v at pos, then attend over the written cache), the
cache written bit for bit, and a decode loop whose caches XLA no longer copies."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pallax import cpu_kernels
from pallax.ir import primitives as ops

pytestmark = pytest.mark.usefixtures("kernel")


def _inputs(b, n, kv, s, h, dtype, seed=0, pos=None):
    rng = np.random.default_rng(seed)

    def f(*shape, dt=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dt)

    q, k, v = f(b, 1, n, h), f(b, 1, kv, h), f(b, 1, kv, h)
    caches = f(b, kv, s, h, dt=dtype), f(b, kv, s, h, dt=dtype)
    pos = rng.integers(0, s, b) if pos is None else np.asarray(pos)
    return q, k, v, *caches, jnp.asarray(pos, jnp.int32)


def _plain(q, k, v, k_cache, v_cache, pos, **kw):
    """Write, then attend over the written cache: dense_attention before the split."""
    k_cache, v_cache = ops.write_kv(k_cache, k, pos), ops.write_kv(v_cache, v, pos)
    return ops.attention_core(q, k_cache, v_cache, pos, **kw), k_cache, v_cache


# (B, N, K, S, H, window, softcap, cache dtype, positions): GQA groups 1..8, head sizes
# with scalar tails (20, 36), the first and the last slot, a window shorter than the
# context, softcap, bf16 caches, and contexts long enough to split the key range.
CASES = [
    (1, 9, 3, 256, 64, None, None, jnp.float32, None),
    (3, 8, 2, 100, 32, None, None, jnp.float32, [0, 99, 50]),
    (2, 4, 4, 300, 20, 17, None, jnp.bfloat16, [5, 299]),
    (2, 8, 1, 70, 36, None, 30.0, jnp.float32, None),
    (1, 8, 8, 4000, 64, None, None, jnp.float32, [3999]),
    (4, 6, 2, 3000, 128, 1000, None, jnp.bfloat16, [2999, 0, 1500, 999]),
    (2, 16, 2, 2500, 64, None, 50.0, jnp.bfloat16, [2400, 1]),
]


@pytest.mark.parametrize("b,n,kv,s,h,window,softcap,dtype,pos", CASES)
def test_kernel_and_xla_rule_match_the_plain_math(b, n, kv, s, h, window, softcap, dtype, pos):
    args = _inputs(b, n, kv, s, h, dtype, seed=s + h, pos=pos)
    kw = dict(scale=h**-0.5, sliding_window=window, softcap=softcap)
    want, k_want, v_want = _plain(*args, **kw)
    got, k_got, v_got = jax.jit(lambda *a: cpu_kernels.decode_attention_cpu(*a, **kw))(*args)
    xla, k_xla, v_xla = jax.jit(lambda *a: ops.dense_attention(*a, **kw))(*args)
    for out in (got, xla):
        assert out.shape == want.shape and out.dtype == want.dtype
        np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)
    for cache, ref in ((k_got, k_want), (v_got, v_want), (k_xla, k_want), (v_xla, v_want)):
        assert cache.dtype == dtype
        got32, want32 = np.asarray(cache.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))
        np.testing.assert_array_equal(got32, want32)


def test_attention_lowers_to_the_kernel_for_decode_only(monkeypatch):
    q, k, v, kc, vc, pos = _inputs(2, 4, 2, 64, 32, jnp.float32)
    kw = dict(scale=0.2)

    def hlo(*a):
        return jax.jit(lambda *a: ops.attention(*a, **kw)).lower(*a).as_text()

    assert "pallax_decode_attention" in hlo(q, k, v, kc, vc, pos)
    bf16 = kc.astype(jnp.bfloat16), vc.astype(jnp.bfloat16)
    assert "pallax_decode_attention" in hlo(q, k, v, *bf16, pos)
    prefill = jnp.concatenate([q, q], axis=1), jnp.concatenate([k, k], axis=1)
    assert "pallax_decode_attention" not in hlo(prefill[0], prefill[1], prefill[1], kc, vc, pos)
    half = kc.astype(jnp.float16), vc.astype(jnp.float16)
    assert "pallax_decode_attention" not in hlo(q, k, v, *half, pos)  # float16: XLA
    monkeypatch.setenv("PALLAX_CPU_KERNELS", "0")
    assert "pallax_decode_attention" not in hlo(q, k, v, kc, vc, pos)


def _decode_loop_copies(layers=4, b=1, s=256):
    """Optimized HLO of a while loop of `layers` attention ops over donated caches, and the
    number of copies of a cache-shaped array in it."""
    h, kv, n = 64, 3, 9

    def loop(caches, x, pos):
        def body(i, st):
            caches, x, pos = st
            new = []
            for kc, vc in caches:
                q = x.reshape(b, 1, n, h)
                kk = q[:, :, :kv] * 0.5
                out, kc, vc = ops.attention(q, kk, kk + 1.0, kc, vc, pos, scale=0.125)
                x = out.reshape(b, n * h)
                new.append((kc, vc))
            return new, x, pos + 1

        return lax.fori_loop(0, 8, body, (caches, x, pos))

    caches = [(jnp.zeros((b, kv, s, h)), jnp.zeros((b, kv, s, h))) for _ in range(layers)]
    args = caches, jnp.ones((b, n * h)), jnp.zeros((b,), jnp.int32)
    text = jax.jit(loop, donate_argnums=(0,)).lower(*args).compile().as_text()
    shape = f"f32[{b},{kv},{s},{h}]"
    return len(re.findall(re.escape(shape) + r"\{[0-9,]*\} copy\(", text))


def test_decode_loop_writes_the_caches_in_place(monkeypatch):
    """The kernel's aliased write copies no cache array in the loop. (The XLA rule is
    left at XLA's mercy: written-then-read caches were copied 4 times a step.)"""
    assert _decode_loop_copies() == 0
    assert _decode_loop_copies(b=2) == 0


def test_bad_query_shape_is_named():
    q, k, v, kc, vc, pos = _inputs(1, 4, 2, 16, 8, jnp.float32)
    with pytest.raises(ValueError, match=r"decode_attention_cpu: q \(1, 2, 4, 8\)"):
        cpu_kernels.decode_attention_cpu(
            jnp.concatenate([q, q], 1), k, v, kc, vc, pos, scale=1.0, sliding_window=None,
            softcap=None,
        )  # fmt: skip
