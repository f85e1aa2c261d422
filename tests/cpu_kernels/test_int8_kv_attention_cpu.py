"""The int8 KV cache's decode kernel (attention.cc's int8 entry): against the reference
(`attention_reference` for the int8 x full cache), the rows it writes bit for bit, a row's
output independent of its batch-mates and of the cache length, and the lowering rule
choosing it for decode only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax import cpu_kernels
from pallax.ir import primitives as ops
from pallax.ir.kvcache import FULL, H2O, Int8

pytestmark = pytest.mark.usefixtures("kernel")

INT8 = Int8()


def _state(b, kv, s, h, rng, filled):
    """A cache holding `filled` [B] random encoded tokens per row (the rest zeros)."""
    k = rng.standard_normal((b, kv, s, h)).astype(np.float32)
    v = rng.standard_normal((b, kv, s, h)).astype(np.float32) * 3
    enc = INT8.encode(jnp.asarray(k), jnp.asarray(v))
    live = (np.arange(s)[None, :] < np.asarray(filled)[:, None])[:, None, :]  # [B, 1, S]
    return {
        name: jnp.where(live[..., None] if arr.ndim == 4 else live, arr, 0).astype(arr.dtype)
        for name, arr in enc.items()
    }


def _inputs(b, n, kv, s, h, pos, valid=None, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, 1, n, h)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, 1, kv, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, 1, kv, h)), jnp.float32)
    pos = jnp.asarray(pos, jnp.int32)
    valid = jnp.ones((b,), jnp.int32) if valid is None else jnp.asarray(valid, jnp.int32)
    state = _state(b, kv, s, h, rng, np.asarray(pos))
    return q, k, v, pos, valid, [state[n] for n in ("k.data", "k.scale", "v.data", "v.scale")]


def _run(fn, q, k, v, pos, valid, cache, policy=FULL, **kw):
    params = ops.attention_params(q, INT8, policy, None, kw.get("scale"),
                                  kw.get("sliding_window"), kw.get("softcap"))  # fmt: skip
    return jax.jit(lambda *a: fn(*a, **params))(q, k, v, pos, valid, *cache)


def _kernel(*args, **params):
    return ops.attention_p.bind(*args, **params)


# (B, N, K, S, H, positions, valid, window, softcap): GQA groups 1..9, head sizes with
# scalar tails (20, 36), the first and the last slot, padded rows (valid 0: the token is
# neither written nor seen; at position 0 the row sees no key), a window, softcap, and
# contexts long enough to split the key range into chunks of 512.
CASES = [
    (1, 9, 3, 256, 64, [100], None, None, None),
    (3, 8, 2, 100, 32, [0, 99, 50], [1, 1, 0], None, None),
    (2, 4, 2, 40, 16, [0, 39], [0, 0], 8, None),
    (2, 4, 4, 300, 20, [5, 299], None, 17, None),
    (2, 8, 1, 70, 36, [69, 3], None, None, 30.0),
    (2, 6, 2, 3000, 128, [2999, 1500], None, 1000, None),
    (1, 16, 2, 1200, 64, [1199], None, None, 50.0),
]


@pytest.mark.parametrize("b,n,kv,s,h,pos,valid,window,softcap", CASES)
def test_kernel_matches_the_reference(b, n, kv, s, h, pos, valid, window, softcap):
    args = _inputs(b, n, kv, s, h, pos, valid, seed=s + h)
    kw = dict(scale=h**-0.5, sliding_window=window, softcap=softcap)
    want, *want_cache = _run(ops.attention_reference, *args, **kw)
    got, *got_cache = _run(_kernel, *args, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    for g, w in zip(got_cache, want_cache, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_a_rows_output_depends_on_that_row_alone():
    """The same query and history alone in a 64-slot cache and as row 1 of 3 in a
    2000-slot cache (the engine's batch against `generate`'s): the same bits."""
    b, n, kv, h, p = 3, 9, 3, 64, 40
    q, k, v, pos, valid, cache = _inputs(b, n, kv, 2000, h, [1500, p, 7], seed=1)
    kw = dict(scale=0.125)
    many, *_ = _run(_kernel, q, k, v, pos, valid, cache, **kw)
    one = [c[1:2, :, :64] for c in cache]
    alone, *_ = _run(_kernel, q[1:2], k[1:2], v[1:2], pos[1:2], valid[1:2], one, **kw)
    np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(many[1]))


def test_attention_lowers_to_the_int8_kernel_for_decode_only(monkeypatch):
    q, k, v, pos, valid, cache = _inputs(2, 4, 2, 64, 32, [3, 9])

    def hlo(q, k, v, policy=FULL):
        params = ops.attention_params(q, INT8, policy, None, 0.2, None, None)
        f = jax.jit(lambda *a: ops.attention_p.bind(*a, **params))
        valid = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
        state = cache
        if policy != FULL:
            from pallax.ir import kvcache

            parts = kvcache.layer_parts(INT8, policy, 2, 32, jnp.float32)
            state = [jnp.zeros([2 if d == "B" else 64 if isinstance(d, str) else d
                                for d in shape], dt) for shape, dt in parts.values()]  # fmt: skip
        return f.lower(q, k, v, pos, valid, *state).as_text()

    target = cpu_kernels.TARGET_ATTENTION_INT8
    assert target in hlo(q, k, v)
    two = lambda x: jnp.concatenate([x, x], axis=1)  # noqa: E731
    assert target not in hlo(two(q), two(k), two(v))  # prefill: the reference
    assert target not in hlo(q, k, v, policy=H2O(budget=32))  # eviction: the reference
    monkeypatch.setenv("PALLAX_CPU_KERNELS", "0")
    assert target not in hlo(q, k, v)
