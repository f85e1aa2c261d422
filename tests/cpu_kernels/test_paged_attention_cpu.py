"""attention.cc's paged entries (cpu_kernels/paged.py): over a pool of pages dealt to the
rows in a shuffled order, the output is the slot-cache kernel's on the same positions
bit for bit, the token lands in its page, and a row never reads or writes a page its
table does not hold."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax.cpu_kernels.paged import paged_decode_cpu, supports
from pallax.ir import kvcache
from pallax.ir import primitives as ops
from pallax.ir.kvcache import DENSE, FULL, H2O, Int8

pytestmark = pytest.mark.usefixtures("kernel")
PAGE, PER_ROW = 16, 6  # S = 96


def _case(fmt, dtype, pos, held, seed=0, b=3, n=6, kv=2, h=40):
    """A slot cache [B, K, S, ...] of random rows, the same rows in a shuffled pool of pages
    (row b holds its first held[b] pages; the pool has spare pages), and the call's q, k,
    v."""
    rng = np.random.default_rng(seed)
    s = PER_ROW * PAGE
    k = jnp.asarray(rng.standard_normal((b, kv, s, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kv, s, h)), jnp.float32)
    state = fmt.encode(k, v) if isinstance(fmt, Int8) else {"k": k.astype(dtype),
                                                              "v": v.astype(dtype)}  # fmt: skip
    names = kvcache.part_names(fmt, FULL)
    slot = [state[name] for name in names]
    pages = b * PER_ROW + 2
    order = rng.permutation(pages)
    table = np.full((b, PER_ROW), pages, np.int32)  # past the pool: no page
    pools = [np.zeros((pages, *x.shape[1:2], PAGE, *x.shape[3:]), x.dtype) for x in slot]
    for r in range(b):
        for j in range(held[r]):
            table[r, j] = order[r * PER_ROW + j]
            for pool, x in zip(pools, slot, strict=True):
                pool[table[r, j]] = np.asarray(x[r, :, j * PAGE : (j + 1) * PAGE])
    q, kn, vn = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                 for shape in ((b, 1, n, h), (b, 1, kv, h), (b, 1, kv, h)))  # fmt: skip
    return q, kn, vn, jnp.asarray(pos, jnp.int32), slot, [jnp.asarray(p) for p in pools], table


@pytest.mark.parametrize(
    ("fmt", "dtype"), [(DENSE, jnp.float32), (DENSE, jnp.bfloat16), (Int8(), jnp.float32)]
)
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (20, 30.0)])
def test_paged_equals_the_slot_kernel(fmt, dtype, window, softcap):
    pos, held = [40, 95, 0], [3, 6, 1]  # every row holds the pages up to its position
    q, k, v, pos, slot, pools, table = _case(fmt, dtype, pos, held)
    valid = jnp.ones((3,), jnp.int32)
    params = ops.attention_params(q, fmt, FULL, None, 0.15, window, softcap)
    assert supports(q, fmt, FULL, pools)
    want = jax.jit(lambda *a: ops.attention_p.bind(*a, **params))(q, k, v, pos, valid, *slot)
    kw = dict(scale=0.15, sliding_window=window, softcap=softcap)
    out, new = jax.jit(lambda *a: paged_decode_cpu(*a[:5], a[5:], jnp.asarray(table), fmt,
                                                   **kw))(q, k, v, pos, valid, *pools)  # fmt: skip
    np.testing.assert_array_equal(out, want[0])
    for pool, after in zip(new, want[1:], strict=True):
        for r in range(3):
            for j in range(held[r]):
                np.testing.assert_array_equal(
                    pool[table[r, j]], after[r, :, j * PAGE : (j + 1) * PAGE]
                )


def test_a_row_stays_inside_its_pages():
    """Row 0 holds one page but sits at position 30 (an idle slot mid-prefill): nothing is
    written, it attends its 16 held positions only; the spare pages stay untouched."""
    q, k, v, pos, slot, pools, table = _case(DENSE, jnp.float32, [30, 50, 5], [1, 4, 1])
    valid = jnp.asarray([0, 1, 1], jnp.int32)
    out, new = paged_decode_cpu(q, k, v, pos, valid, pools, jnp.asarray(table), DENSE,
                                scale=0.2, sliding_window=None, softcap=None)  # fmt: skip
    held = set(table[table < pools[0].shape[0]].tolist())
    for before, after in zip(pools, new, strict=True):
        np.testing.assert_array_equal(after[table[0, 0]], before[table[0, 0]])
        spare = sorted(set(range(before.shape[0])) - held)
        np.testing.assert_array_equal(after[np.asarray(spare)], before[np.asarray(spare)])
    # what row 0 sees: its first page's 16 positions, without the token
    from pallax.pallas_kernels.decode_attention import decode_attention_reference

    want = decode_attention_reference(q[:1, 0], slot[0][:1, :, :PAGE], slot[1][:1, :, :PAGE],
                                      jnp.asarray([PAGE], jnp.int32), scale=0.2)  # fmt: skip
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(out[0, 0], want[0], rtol=1e-5, atol=1e-6)


def test_other_caches_keep_the_gathered_path():
    q = jnp.zeros((1, 1, 2, 8))
    assert not supports(q, DENSE, H2O(budget=8), [jnp.zeros((2, 1, 16, 8))])
    assert not supports(jnp.zeros((1, 4, 2, 8)), DENSE, FULL, [jnp.zeros((2, 1, 16, 8))])
    assert not supports(q, DENSE, FULL, [jnp.zeros((2, 1, 16, 8), jnp.float16)])
