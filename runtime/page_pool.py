"""The paged KV cache's host bookkeeping (runtime/kv_pages.py has the device side):
which pages are free, a reference count per page, each slot's block table, the prefix
cache (full pages of prompt KV keyed by their token prefix, shared by reference and
evicted least recently used once no request holds them), and preemption by swapping a
request's pages (and its per-slot arrays, KIVI's ring) out to host memory and back.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np


def pages_for(tokens: int, page: int) -> int:
    return -(-tokens // page)


@functools.partial(jax.jit, donate_argnums=(0,), static_argnums=(4,))
def _write(pool, ids, slot, data, per_slot):
    """Pages `ids` (and row `slot` of the per-slot arrays) of `pool` set to `data`."""
    return {k: p.at[slot].set(data[k][0]) if k in per_slot else p.at[ids].set(data[k], mode="drop")
            for k, p in pool.items()}  # fmt: skip


@functools.partial(jax.jit, static_argnums=(3,))
def _read(pool, ids, slot, per_slot):
    """Pages `ids` of `pool` (zeros past it) and row `slot` of the per-slot arrays."""
    take = lambda p: jnp.take(p, ids, axis=0, mode="fill", fill_value=0)  # noqa: E731
    return {k: p[slot][None] if k in per_slot else take(p) for k, p in pool.items()}


class PagedKV:
    """Pages of a pool: free pages, reference counts, block tables, the prefix cache. A
    request never holds more than `longest` tokens' pages (what `plan` checked fits)."""

    def __init__(self, pages: int, page: int, longest: int, rows: int, per_row: int,
                 per_slot: tuple = ()):  # fmt: skip
        self.pages, self.page, self.per_row = pages, page, per_row
        self.longest = longest
        self.per_slot = tuple(per_slot)  # arrays kept per slot (KIVI's ring): swapped too
        self.sharing = not per_slot  # a prefix is not pages alone when the ring holds some
        self.table = np.full((rows, per_row), pages, np.int32)
        self.held = [0] * rows  # pages each slot's table holds (its leading entries)
        self.refs = np.zeros((pages,), np.int32)
        self._free = list(range(pages))[::-1]
        self._keys: collections.OrderedDict = collections.OrderedDict()  # key -> page, LRU
        self._ids: dict = {}  # key -> a small int, the parent of the next page's key
        self._next_id = 0
        self.dirty = True  # the table changed since the device last got it

    # ------------------------------------------------------------------ pages
    def available(self) -> int:
        """Pages free now or held by the prefix cache alone (evictable)."""
        return len(self._free) + sum(1 for p in self._keys.values() if self.refs[p] == 1)

    def fits(self, live) -> bool:
        """Whether a waiting request's pages are free: a preempted one's, or a new one's
        whole prompt and its first generated token."""
        if live.saved is not None:
            need = live.saved[1] + 1
        else:
            need = pages_for(len(live.req.prompt_ids) + 1, self.page)
        return min(need, pages_for(self.longest, self.page)) <= self.available()

    def used(self) -> int:
        return self.pages - len(self._free)

    def reserve(self, slot: int, tokens: int) -> bool:
        """Give `slot` pages for its first `tokens` positions; False (nothing taken) if
        they do not fit."""
        need = pages_for(min(tokens, self.longest), self.page) - self.held[slot]
        if need <= 0:
            return True
        if need > self.available():
            return False
        for _ in range(need):
            self._hold(slot, self._take())
        return True

    def release(self, slot: int) -> None:
        for i in range(self.held[slot]):
            self._unref(int(self.table[slot, i]))
        self.table[slot] = self.pages
        self.held[slot] = 0
        self.dirty = True

    def _hold(self, slot: int, page: int) -> None:
        self.refs[page] += 1
        self.table[slot, self.held[slot]] = page
        self.held[slot] += 1
        self.dirty = True

    def _unref(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] == 0:
            self._free.append(page)

    def _take(self) -> int:
        if not self._free:  # evict the least recently used page no request holds
            key = next(k for k, p in self._keys.items() if self.refs[p] == 1)
            self._unref(self._keys.pop(key))
            self._ids.pop(key)  # its descendants' keys are unreachable now, and age out
        return self._free.pop()

    # ----------------------------------------------------------- prefix cache
    def _chain(self, ids):
        from pallax.runtime.prefix_cache import page_keys

        return page_keys(ids, self.page, self._ids)

    def share(self, slot: int, ids) -> int:
        """Point `slot`'s table at the cached pages of `ids`' longest cached run of leading
        full pages (one token at least is left to prefill, for its logits); the tokens."""
        n = 0
        for _, key in self._chain(ids[: len(ids) - 1]):
            page = self._keys.get(key)
            if page is None:
                break
            self._keys.move_to_end(key)
            self._hold(slot, page)
            n += self.page
        return n

    def insert(self, slot: int, ids) -> None:
        """Keep `slot`'s full pages of prompt `ids` in the prefix cache (no copy: the
        cache holds a reference to the slot's own pages)."""
        if not self.sharing:
            return
        for i, key in self._chain(ids):
            if key in self._keys:
                self._keys.move_to_end(key)
            elif i < self.held[slot]:
                page = int(self.table[slot, i])
                self.refs[page] += 1
                self._keys[key] = page
                self._next_id += 1
                self._ids[key] = self._next_id

    # ------------------------------------------------------------------- swap
    def swap_out(self, pool, slot: int):
        """(host copies of `slot`'s pages, how many); the pages are released."""
        m = self.held[slot]
        ids = jnp.asarray(self._padded(self.table[slot, :m]))
        data = jax.device_get(_read(pool, ids, slot, self.per_slot))
        self.release(slot)
        return {k: v if k in self.per_slot else v[:m] for k, v in data.items()}, m

    def admit(self, live, share: bool) -> int:
        """Pages for a request taking a slot (the caller checked `fits`): a preempted
        one's as many as it had, a new one's its prompt's, the prefix cache's first
        (`share`); the prompt tokens those hold."""
        if live.saved is not None:
            self.reserve(live.slot, live.saved[1] * self.page)
            return 0
        n = self.share(live.slot, live.req.prompt_ids) if share and self.sharing else 0
        self.reserve(live.slot, len(live.req.prompt_ids))
        return n

    def restore(self, pool, slot: int, saved):
        """`pool` with the pages `admit` gave a preempted request holding what `swap_out`
        saved of it."""
        data, m = saved
        pad = {k: v if k in self.per_slot else
               np.concatenate([v, np.zeros((self.per_row - m, *v.shape[1:]), v.dtype)])
               for k, v in data.items()}  # fmt: skip
        ids = jnp.asarray(self._padded(self.table[slot, :m]))
        return _write(pool, ids, slot, pad, self.per_slot)

    def _padded(self, ids):
        out = np.full((self.per_row,), self.pages, np.int32)  # past the pool: dropped
        out[: len(ids)] = ids
        return out


def room(engine, live, tokens: int) -> bool:
    """Pages for `live`'s first `tokens` positions in `engine`, preempting the requests
    admitted last until they fit; False if `live` itself was preempted (or ended)."""
    while not engine._kv.reserve(live.slot, tokens):
        preempt(engine, engine._running[-1])
        if live not in engine._running:
            return False
    return True


def preempt(engine, live) -> None:
    """Swap `live`'s pages out to host memory; it waits at the head of the queue (vLLM's
    swap preemption: its KV comes back with the same bits, nothing is recomputed)."""
    engine._read_flight()  # its token in flight, if any, is handed out first
    if live not in engine._running:
        return  # it ended on that token
    live.saved = engine._kv.swap_out(engine._cache["pool"], live.slot)
    engine._running.remove(live)
    engine._free.append(live.slot)
    engine._sampling = None
    live.draft_pos = 0  # a draft model's cache is prefilled again
    engine._waiting.appendleft(live)
    engine.metrics.add("preempted", 1)
