"""Paged KV for the serving engine: a pool of fixed-size pages and a block table per slot.

`Engine(compiled, kv_pages=N, page_size=P)` keeps the target's cache as one pool of N
pages of P tokens per cache array (`[N, kv, P, ...]` where the slot cache has
`[B, kv, S, ...]`) instead of `max_batch` rows of `max_len` tokens, so memory follows
the tokens requests hold, not their limits (vLLM's PagedAttention). Each slot has a
block table (`PagedKV.table`, [rows, S / P] page ids; N where no page is held): its
positions p live in page `table[slot, p // P]` at row `p % P`.

The engine's steps run the graph's step with one rule for the `attention` primitive
(`paged_rule`). Decode (one token, every position kept) reads and writes each row's
positions in its pages where they lie: on CPU in attention.cc's paged entries (dense
and int8 caches; `cpu_kernels/paged.py`), on tpu and cuda in the Pallas kernel
(`pallas_kernels/paged_attention`, dense caches), chosen per platform at lowering.
Everything else (prompt chunks, verification, other caches) gathers the layer's pages
of each row into the slot cache's shape (pages a row does not hold read zeros), runs
the op's own method on it (so every format and kernel that runs on a slot cache runs
here, with the same bits), and writes back the positions the call wrote; positions in
pages a row does not hold are dropped. Only one layer's gathered rows live at a time.
Formats whose state is rows addressed by position (dense, int8) can be paged
(`prefix_cache.supported`); KIVI's staging ring and H2O's or the sinks' rows cannot,
and `kv_pages` is refused for them.

`PagedKV` is the host's bookkeeping: which pages are free, a reference count per page,
and the prefix cache (full pages of prompt KV keyed by their token prefix, shared by
reference and evicted least recently used once no request holds them). When a request
needs a page and none is free, the engine preempts the request admitted last: its
pages are copied to host memory (`swap_out`) and freed, and it waits at the head of the
queue until its pages fit again (`admit`, `restore`), so no request is dropped and its
KV keeps its bits.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PAGE_SIZE = 16  # tokens per page unless the engine is told otherwise


def paged_rule(table, page: int, inner=None):
    """A rule for `attention_p` whose cache operands are pools [N, kv, page, ...]: the
    rows of `table` [B, n] are gathered into [B, kv, n * page, ...], `inner` (the op
    itself by default) runs on them, and the positions `pos .. pos + T - 1` it wrote go
    back to their pages. The op's dense decode (one token, every position kept) lowers
    on tpu and cuda to the paged kernel instead, which reads the pages where they lie
    (pallas_kernels/paged_attention)."""
    from pallax.ir import primitives as ops

    plain = inner is None
    if plain:

        def inner(eqn, q, k, v, pos, valid, *cache):
            return ops.attention_p.bind(q, k, v, pos, valid, *cache, **eqn.params)

    def gathered(eqn, q, k, v, pos, valid, *pools):
        b, n = table.shape
        views = [_gather(p, table) for p in pools]
        out, *views = inner(eqn, q, k, v, pos, valid, *views)
        t = q.shape[1]
        at = jnp.minimum(pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :], n * page - 1)
        new = []
        for p, view in zip(pools, views, strict=True):
            rows = jnp.take_along_axis(view, at.reshape(b, 1, t, *[1] * (view.ndim - 3)), axis=2)
            new.append(_put(p, jnp.moveaxis(rows, 2, 1), table, pos, page))  # [B, T, kv, ...]
        return [out, *new]

    def rule(eqn, q, k, v, pos, valid, *pools):
        branches = _kernel_branches(eqn, q, pools, table, page) if plain else {}
        if not branches:
            return gathered(eqn, q, k, v, pos, valid, *pools)
        return list(lax.platform_dependent(
            q, k, v, pos, valid, *pools,
            default=lambda *args: gathered(eqn, *args), **branches,
        ))  # fmt: skip

    return rule


def _put(pool, rows, table, pos, page: int):
    """`pool` with `rows` [B, T, kv, ...] written at positions pos .. pos + T - 1 of each
    row's pages; positions in pages a row does not hold (or past its table) are dropped."""
    b, t = rows.shape[:2]
    n = table.shape[1]
    at = pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    slot = jnp.take_along_axis(table, jnp.minimum(at // page, n - 1), axis=1)
    ids = jnp.where(at < n * page, slot, pool.shape[0]).reshape(-1)  # N: dropped
    rows = rows.reshape(b * t, *rows.shape[2:]).astype(pool.dtype)
    return pool.at[ids, :, (at % page).reshape(-1)].set(rows, mode="drop")


def kernel_branch(eqn, table, page: int, platform: str, interpret: bool = False):
    """The dense decode on `platform`'s paged kernel: the token's K and V go to their
    pages, then the query attends the pages through the table (as `_dense_full_rule`
    writes, then attends with the dense decode kernel)."""
    from pallax.pallas_kernels.paged_attention import paged_decode_attention

    params = eqn.params

    def branch(q, k, v, pos, valid, k_pool, v_pool):
        k_pool, v_pool = _put(k_pool, k, table, pos, page), _put(v_pool, v, table, pos, page)
        out = paged_decode_attention(
            q[:, 0].astype(k_pool.dtype), k_pool, v_pool, table, (pos + 1).astype(jnp.int32),
            scale=params["scale"], sliding_window=params["sliding_window"],
            softcap=params["softcap"], platform=platform, interpret=interpret,
        )  # fmt: skip
        return [out[:, None].astype(q.dtype), k_pool, v_pool]

    return branch


def _cpu_branch(eqn, table):
    """The decode in attention.cc's paged entries (cpu_kernels/paged.py)."""
    from pallax.cpu_kernels.paged import paged_decode_cpu

    params = eqn.params

    def branch(q, k, v, pos, valid, *pools):
        out, pools = paged_decode_cpu(
            q, k, v, pos, valid, pools, table, params["format"], scale=params["scale"],
            sliding_window=params["sliding_window"], softcap=params["softcap"],
        )  # fmt: skip
        return [out, *pools]

    return branch


def _kernel_branches(eqn, q, pools, table, page: int) -> dict:
    """{platform: the decode reading pages in place} where a kernel covers it: CPU's for
    dense and int8 caches, the Pallas one on tpu and cuda for dense ones."""
    from pallax.cpu_kernels import paged as cpu_paged
    from pallax.ir.kvcache import FULL, Dense
    from pallax.pallas_kernels.paged_attention import supports
    from pallax.pallas_kernels.platforms import PLATFORMS

    fmt, policy = eqn.params["format"], eqn.params["policy"]
    if q.shape[1] != 1 or policy != FULL:
        return {}
    branches = {}
    if cpu_paged.supports(q, fmt, policy, pools):
        branches["cpu"] = _cpu_branch(eqn, table)
    if isinstance(fmt, Dense):
        head_dim, dtype = pools[0].shape[-1], pools[0].dtype
        for platform in PLATFORMS:
            if supports(platform, page, head_dim, dtype):
                branches[platform] = kernel_branch(eqn, table, page, platform)
    return branches


def _gather(pool, table):
    """[N, kv, page, ...] pool, [B, n] table -> [B, kv, n * page, ...] (zeros where the
    table holds no page)."""
    g = jnp.take(pool, table, axis=0, mode="fill", fill_value=0)  # [B, n, kv, page, ...]
    g = jnp.moveaxis(g, 1, 2)
    return g.reshape(g.shape[0], g.shape[1], g.shape[2] * g.shape[3], *g.shape[4:])


def paged_run(graph, name: str, page: int, weights, cache, *args):
    """`graph.run(name, weights, cache, *args)` for a paged cache {"pool", "table"}."""
    from pallax.ir import primitives as ops
    from pallax.ir.rewrite import eval_with_rules

    step = graph.steps[name]
    flat = jax.tree.leaves((weights, cache["pool"], *args))
    rules = {ops.attention_p: paged_rule(cache["table"], page)}
    outs = eval_with_rules(step.jaxpr.jaxpr, step.jaxpr.consts, flat, rules)
    logits, pool = jax.tree.unflatten(step.out_tree, outs)
    return logits, {"pool": pool, "table": cache["table"]}


def plan(kv_pages, page_size, shape, compiled) -> tuple[int, int, int]:
    """(pages, page size, the most tokens a request holds) for an engine of `shape` (an
    `engine_steps.EngineShape`); bad values are refused by name, before any compile."""
    from pallax.runtime.engine_steps import positive_int

    if kv_pages is None:
        raise ValueError(f"page_size={page_size!r} needs kv_pages= (the pool's size in pages)")
    from pallax.runtime.artifact import Artifact

    if isinstance(compiled, Artifact):  # its engine modules were exported for slot caches
        raise ValueError(
            "kv_pages= needs a CompiledModel: an artifact's engine modules were exported "
            "for a slot cache"
        )
    page = PAGE_SIZE if page_size is None else positive_int("page_size", page_size)
    if shape.cache_len % page:
        raise ValueError(
            f"page_size={page} must divide the engine's cache length {shape.cache_len} (a "
            "power of two up to 256 does)"
        )
    pages = positive_int("kv_pages", kv_pages)
    longest = min(shape.max_len + shape.speculate, shape.cache_len)  # drafts past max_len
    if pages < pages_for(longest, page):
        raise ValueError(
            f"kv_pages={pages} must be at least {pages_for(longest, page)}: one request at "
            f"max_len={shape.max_len} (with {shape.speculate} drafted tokens) needs {longest} "
            f"tokens of cache, {pages_for(longest, page)} pages of {page}"
        )
    return pages, page, longest


def check_layout(graph) -> None:
    """Refuse a cache whose state is not rows addressed by position on one device."""
    from pallax.runtime.prefix_cache import addressed

    if not addressed(graph):
        raise ValueError(
            f"kv_pages= needs a cache of rows addressed by position on one device (dense or "
            f"int8, unsharded); this model's is {graph.cache.kind}"
        )


def allocate(layout, pages: int, page: int) -> dict:
    """A zeroed pool of `pages` pages for a cache layout."""
    shapes = layout.shapes(1, page)
    return {k: jnp.zeros((pages, *s.shape[1:]), s.dtype) for k, s in shapes.items()}


def pages_for(tokens: int, page: int) -> int:
    return -(-tokens // page)


@functools.partial(jax.jit, donate_argnums=(0,))
def _write(pool, ids, data):
    return {k: p.at[ids].set(data[k], mode="drop") for k, p in pool.items()}


@jax.jit
def _read(pool, ids):
    return {k: jnp.take(p, ids, axis=0, mode="fill", fill_value=0) for k, p in pool.items()}


class PagedKV:
    """Pages of a pool: free pages, reference counts, block tables, the prefix cache. A
    request never holds more than `longest` tokens' pages (what `plan` checked fits)."""

    def __init__(self, pages: int, page: int, longest: int, rows: int, per_row: int):
        self.pages, self.page, self.per_row = pages, page, per_row
        self.longest = longest
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
        key = None
        for i in range(len(ids) // self.page):
            key = (None if key is None else self._ids[key],
                   tuple(ids[i * self.page : (i + 1) * self.page]))  # fmt: skip
            yield i, key
            if key not in self._ids:
                return

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
        data = jax.device_get(_read(pool, jnp.asarray(self._padded(self.table[slot, :m]))))
        self.release(slot)
        return {k: v[:m] for k, v in data.items()}, m

    def admit(self, live, share: bool) -> int:
        """Pages for a request taking a slot (the caller checked `fits`): a preempted
        one's as many as it had, a new one's its prompt's, the prefix cache's first
        (`share`); the prompt tokens those hold."""
        if live.saved is not None:
            self.reserve(live.slot, live.saved[1] * self.page)
            return 0
        n = self.share(live.slot, live.req.prompt_ids) if share else 0
        self.reserve(live.slot, len(live.req.prompt_ids))
        return n

    def restore(self, pool, slot: int, saved):
        """`pool` with the pages `admit` gave a preempted request holding what `swap_out`
        saved of it."""
        data, m = saved
        pad = {k: np.concatenate([v, np.zeros((self.per_row - m, *v.shape[1:]), v.dtype)])
               for k, v in data.items()}  # fmt: skip
        return _write(pool, jnp.asarray(self._padded(self.table[slot, :m])), pad)

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
