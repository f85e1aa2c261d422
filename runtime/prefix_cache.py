"""Prefix caching for the engine: full pages of prompt KV kept by their token prefix.

When a request's prompt is in its slot, every full page of it (`page` tokens) not kept
yet is copied into a pool on the device, keyed by the exact tokens from the start of the
prompt to the end of that page (a chain: the key of page i is (key of page i-1, its
tokens)). A later prompt that starts with the same pages gets them copied into its slot
and is prefilled from there on. The pool evicts its least recently used pages, a page's
descendants with it.

The KV rows of a position depend only on the tokens up to it (every op reduces a row in
an order fixed by the row, `ir.primitives.base.BATCH_INVARIANT`, and prefill attention's
tiling makes chunk boundaries harmless), so a prompt prefilled from cached pages gets
the bits it would get from position 0. Formats whose state is not rows addressed by
position (KIVI's staging ring and groups, H2O's and the sinks' rows) are not cached:
`supported` says so.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def supported(layout) -> bool:
    """Whether every cache array is [B, ..., S, ...] with positions on axis 2."""
    return all(
        len(shape) >= 3 and shape[0] == "B" and shape[2] == "S" and "S" not in shape[3:]
        for _, shape, _ in layout.entries
    )


def addressed(graph) -> bool:
    """Whether a graph's cache is rows addressed by position on one device: a prefix can
    be copied in, and KV past a request's position is overwritten before it is read."""
    return supported(graph.cache) and graph.meta.get("mesh") is None


def page_keys(ids, page: int, known: dict):
    """(i, key) of `ids`' full pages of `page` tokens: the key of page i is (the small int
    `known` gives page i - 1's key, page i's tokens), exact where a hash may collide. The
    chain stops after the first key `known` lacks (no later key can be known)."""
    key = None
    for i in range(len(ids) // page):
        key = (None if key is None else known[key], tuple(ids[i * page : (i + 1) * page]))
        yield i, key
        if key not in known:
            return


class PrefixCache:
    """A pool of `pages` pages of `page` tokens for a slot cache of length `seq`."""

    def __init__(self, layout, pages: int, page: int, seq: int):
        self.page, self.pages, self.seq = page, pages, seq
        shapes = layout.shapes(1, seq)
        self.pool = {
            k: jnp.zeros((pages, *s.shape[1:2], page, *s.shape[3:]), s.dtype)
            for k, s in shapes.items()
        }
        self._keys: collections.OrderedDict = collections.OrderedDict()  # key -> page, LRU
        self._ids: dict = {}  # key -> a small int, the parent of the next page's key
        self._children: dict = collections.defaultdict(set)
        self._free = list(range(pages))[::-1]
        self._next_id = 0

    def _chain(self, ids):
        return page_keys(ids, self.page, self._ids)

    def lookup(self, ids) -> list[int]:
        """Pool pages holding the longest cached run of `ids`' leading full pages (at least
        one token is left to prefill, for its logits); marks them recently used."""
        found = []
        for _, key in self._chain(ids[: len(ids) - 1]):
            if key not in self._keys:
                break
            self._keys.move_to_end(key)
            found.append(self._keys[key])
        return found

    def insert(self, ids, cache, slot: int) -> int:
        """Copy `ids`' full pages not kept yet from row `slot` of `cache`; the pages copied."""
        starts, targets, path = [], [], set()
        for i, key in self._chain(ids):
            path.add(key)
            if key in self._keys:
                self._keys.move_to_end(key)
                continue
            page = self._take(path)
            if page is None:
                break
            self._keys[key] = page
            self._next_id += 1
            self._ids[key] = self._next_id
            if key[0] is not None:
                self._children[key[0]].add(key)
            starts.append(i * self.page)
            targets.append(page)
        if targets:
            self.pool = _save(self.pool, cache, jnp.int32(slot), *self._pad(starts, targets))
        return len(targets)

    def load(self, cache, slot: int, pages: list[int]):
        """`cache` with the pool's `pages` written to positions 0.. of row `slot`."""
        starts = [i * self.page for i in range(len(pages))]
        return _load(cache, self.pool, jnp.int32(slot), *self._pad(starts, pages))

    def _pad(self, starts, pages):
        n = self.seq // self.page
        s = np.full((n,), self.seq, np.int32)  # past the cache: dropped
        p = np.full((n,), self.pages, np.int32)  # past the pool: dropped
        s[: len(starts)], p[: len(pages)] = starts, pages
        return jnp.asarray(s), jnp.asarray(p)

    def _take(self, keep) -> int | None:
        if self._free:
            return self._free.pop()
        for key in self._keys:  # least recently used first, not on the path being written
            if key not in keep:
                self._evict(key)
                return self._free.pop()
        return None

    def _evict(self, key) -> None:
        for child in list(self._children.pop(self._ids.get(key), ())):
            if child in self._keys:
                self._evict(child)
        self._free.append(self._keys.pop(key))
        self._ids.pop(key, None)


def _windows(page: int, starts):
    return starts[:, None] + jnp.arange(page, dtype=jnp.int32)[None, :]  # [n, page]


@functools.partial(jax.jit, donate_argnums=(0,))
def _save(pool, cache, slot, starts, pages):
    out = {}
    for k, p in pool.items():
        row = jnp.take(cache[k], slot, axis=0)  # [kv, S, ...]
        idx = jnp.clip(_windows(p.shape[2], starts), 0, row.shape[1] - 1)
        got = jnp.moveaxis(jnp.take(row, idx, axis=1), 1, 0)  # [n, kv, page, ...]
        out[k] = p.at[pages].set(got, mode="drop")
    return out


@functools.partial(jax.jit, donate_argnums=(0,))
def _load(cache, pool, slot, starts, pages):
    out = {}
    for k, c in cache.items():
        p = pool[k]
        got = jnp.take(p, pages, axis=0, mode="fill", fill_value=0)  # [n, kv, page, ...]
        idx = _windows(p.shape[2], starts)  # [n, page], past S for padding
        row = jnp.take(c, slot, axis=0).at[:, idx].set(jnp.moveaxis(got, 1, 0), mode="drop")
        out[k] = lax.dynamic_update_index_in_dim(c, row, slot, axis=0)
    return out
