"""Paged decode attention kernels: interpret mode against the jnp reference, tpu/cuda
lowering, and the engine's paged rule taking the kernel on those platforms.

Pool rows a sequence does not attend (past its length, before its sliding window, in
pages its table does not name) are NaN, so any read of them that reaches the output
fails the test; table entries past a sequence's pages hold ids outside the pool."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallax.pallas_kernels.decode_attention import decode_attention_reference
from pallax.pallas_kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
    supports,
)
from pallax.pallas_kernels.paged_attention.reference import gather_pages

TRITON = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
BASE_TOL = {jnp.dtype(jnp.float32): 1e-6, jnp.dtype(jnp.bfloat16): 2e-3}


def _inputs(batch, heads, kv, page, n, head_dim, dtype, lengths, window=None, seed=0):
    """A pool whose pages are dealt to the sequences in a shuffled order, NaN where no
    sequence attends."""
    rng = np.random.default_rng(seed)
    num_pages = batch * n + 3  # spare pages nobody holds
    order = rng.permutation(num_pages)
    table = order[: batch * n].reshape(batch, n).astype(np.int32)
    k = rng.normal(size=(num_pages, kv, page, head_dim)).astype(np.float32)
    v = rng.normal(size=(num_pages, kv, page, head_dim)).astype(np.float32)
    attended = np.zeros((num_pages, page), bool)
    lengths = np.asarray(lengths, np.int32)
    for b in range(batch):
        lo = 0 if window is None else max(lengths[b] - window, 0)
        for p in range(lo, lengths[b]):
            attended[table[b, p // page], p % page] = True
    k = np.where(attended[:, None, :, None], k, np.nan)
    v = np.where(attended[:, None, :, None], v, np.nan)
    for b in range(batch):  # entries past the pages a sequence holds: any id, even none
        used = -(-lengths[b] // page)
        table[b, used:] = rng.choice([num_pages, 2**20, -1], size=n - used)
    q = rng.normal(size=(batch, heads, head_dim)).astype(np.float32)
    to = functools.partial(jnp.asarray, dtype=dtype)
    return to(q), to(k), to(v), jnp.asarray(table), jnp.asarray(lengths)


CASES = [  # (batch, heads, kv heads, page, pages per sequence, head dim), lengths, window, softcap
    ((3, 4, 2, 16, 5, 64), [1, 37, 80], None, None),
    ((2, 8, 1, 16, 4, 32), [64, 17], 20, None),
    ((2, 3, 3, 32, 3, 16), [95, 33], None, 30.0),
    ((1, 9, 3, 16, 6, 64), [0], None, None),  # an empty sequence: zeros
]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(("shape", "lengths", "window", "softcap"), CASES)
def test_kernel_matches_reference(platform, dtype, shape, lengths, window, softcap):
    q, k, v, table, lengths = _inputs(*shape, dtype, lengths, window)
    kw = dict(scale=shape[-1] ** -0.5, sliding_window=window, softcap=softcap)
    ref_table = jnp.where((table >= 0) & (table < k.shape[0]), table, k.shape[0])
    expected = paged_decode_attention_reference(q, k, v, ref_table, lengths, **kw)
    out = paged_decode_attention(q, k, v, table, lengths, interpret=True, platform=platform, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(jnp.isfinite(out).all())
    base = BASE_TOL[jnp.dtype(dtype)]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32),
                               atol=base * math.sqrt(shape[3] * shape[4]), rtol=base)  # fmt: skip


def test_reference_is_the_dense_reference_on_gathered_pages():
    q, k, v, table, lengths = _inputs(2, 4, 2, 16, 3, 32, jnp.float32, [40, 48])
    dense_k, dense_v = gather_pages(k, table), gather_pages(v, table)
    assert dense_k.shape == (2, 2, 48, 32)
    np.testing.assert_array_equal(dense_k[1, :, 16:32], k[table[1, 1]])  # page 1 of row 1
    np.testing.assert_array_equal(dense_v[0, :, 32:48], v[table[0, 2]])
    kw = dict(scale=0.2, sliding_window=30)
    np.testing.assert_array_equal(
        paged_decode_attention_reference(q, k, v, table, lengths, **kw),
        decode_attention_reference(q, dense_k, dense_v, lengths, **kw),
    )


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_export_lowers_to_the_kernel(platform):
    q, k, v, table, lengths = _inputs(2, 4, 2, 16, 4, 64, jnp.bfloat16, [30, 64])
    fn = jax.jit(functools.partial(paged_decode_attention, scale=0.125, platform=platform))
    checks = [TRITON] if platform == "cuda" else []
    text = export.export(fn, platforms=[platform], disabled_checks=checks)(
        q, k, v, table, lengths
    ).mlir_module()
    marker = "__gpu$xla.gpu.triton" if platform == "cuda" else "@tpu_custom_call"
    assert marker in text and "paged_decode_attention" in text


def test_unsupported_pages_are_refused_by_name():
    q, k, v, table, lengths = _inputs(1, 2, 1, 8, 2, 64, jnp.float32, [9])
    assert supports("tpu", 8, 64, jnp.float32) and not supports("cuda", 8, 64, jnp.float32)
    with pytest.raises(ValueError, match="pages of 8 tokens .* no cuda kernel"):
        paged_decode_attention(q, k, v, table, lengths, scale=1.0, platform="cuda")
    with pytest.raises(ValueError, match="block_table .* must be int32"):
        paged_decode_attention(q, k, v, table.astype(jnp.int16), lengths, scale=1.0,
                               platform="tpu")  # fmt: skip
