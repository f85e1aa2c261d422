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
here, with the same bits), and writes back the positions the call may have written
(with KIVI: the granules that left its staging ring); positions in pages a row does not
hold are dropped. Only one layer's gathered rows live at a time.

What pages (`page_parts`): arrays of rows addressed by position (dense, int8, KIVI's
packed rows and per-token scales) and KIVI's per-granule key scales (page / G rows a
page, so pages are a multiple of its group, 32 by default). KIVI's staging ring and
first rows stay per slot (`[rows, ...]`, as in the slot cache; swapped with a preempted
request's pages). H2O's and the sinks' rows hold slots, not positions: `kv_pages` is
refused for them, and for a sharded cache.

The host's bookkeeping is `page_pool.PagedKV`: which pages are free, a reference count
per page, and the prefix cache (full pages of prompt KV keyed by their token prefix,
shared by reference and evicted least recently used once no request holds them). When a
request needs a page and none is free, the engine preempts the request admitted last:
its pages are copied to host memory (`swap_out`) and freed, and it waits at the head of
the queue until its pages fit again (`admit`, `restore`), so no request is dropped and
its KV keeps its bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallax.pallas_kernels.paged_attention.reference import gather_pages
from pallax.runtime.page_pool import pages_for

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
        fmt = eqn.params["format"]
        per_row = _tokens_per_row(fmt, eqn.params["policy"])  # 0: a per-slot array
        views = [gather_pages(p, table) if g else p for p, g in zip(pools, per_row, strict=True)]
        out, *views = inner(eqn, q, k, v, pos, valid, *views)
        # what the call may have written: positions pos .. pos + T - 1, or with a staging
        # ring (KIVI) the granules that left it, from stored(pos) on
        t = q.shape[1]
        first = fmt.stored(pos)
        span = -(-(fmt.staging + t) // fmt.granule) * fmt.granule if fmt.staging else t
        new = []
        for p, view, g in zip(pools, views, per_row, strict=True):
            if not g:
                new.append(view)
                continue
            at = first[:, None] // g + jnp.arange(span // g or 1, dtype=jnp.int32)[None, :]
            idx = jnp.minimum(at, view.shape[2] - 1)
            idx = idx.reshape(at.shape[0], 1, at.shape[1], *[1] * (view.ndim - 3))
            rows = jnp.take_along_axis(view, idx, axis=2)
            new.append(_put(p, jnp.moveaxis(rows, 2, 1), table, first // g, page // g))
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


def _tokens_per_row(fmt, policy) -> list[int]:
    """Per cache operand of the op: tokens per row of a paged array (1, or the granule for
    KIVI's per-granule scales), or 0 for an array kept per slot (its staging ring, its
    first rows)."""
    from pallax.ir import kvcache

    return [0 if name.endswith((".res", ".first")) else
            fmt.granule if name in fmt.granule_parts else 1
            for name in kvcache.part_names(fmt, policy)]  # fmt: skip


def _put(pool, rows, table, pos, page: int):
    """`pool` with `rows` [B, T, kv, ...] written at rows pos .. pos + T - 1 of each
    sequence's pages of `page` rows; rows in pages it does not hold (or past its table)
    are dropped."""
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


def plan(kv_pages, page_size, shape, compiled) -> tuple[int, int, int, tuple]:
    """(pages, page size, the most tokens a request holds, the cache arrays kept per slot)
    for an engine of `shape` (an
    `engine_steps.EngineShape`) on `compiled`; bad values are refused by name, before any
    compile (the engine's decode graph is traced for its cache layout)."""
    from pallax.runtime.artifact import Artifact
    from pallax.runtime.engine_steps import positive_int

    if kv_pages is None:
        raise ValueError(f"page_size={page_size!r} needs kv_pages= (the pool's size in pages)")
    if isinstance(compiled, Artifact):  # its engine modules were exported for slot caches
        raise ValueError(
            "kv_pages= needs a CompiledModel: an artifact's engine modules were exported "
            "for a slot cache"
        )
    pages = positive_int("kv_pages", kv_pages)
    page = None if page_size is None else positive_int("page_size", page_size)
    graph = compiled.slot_steps(shape).decode()[0]
    page = default_page(graph.cache) if page is None else page
    check_layout(graph, page)
    if shape.cache_len % page:
        raise ValueError(
            f"page_size={page} must divide the engine's cache length {shape.cache_len} (a "
            "power of two up to 256 does)"
        )
    longest = min(shape.max_len + shape.speculate, shape.cache_len)  # drafts past max_len
    if pages < pages_for(longest, page):
        raise ValueError(
            f"kv_pages={pages} must be at least {pages_for(longest, page)}: one request at "
            f"max_len={shape.max_len} (with {shape.speculate} drafted tokens) needs {longest} "
            f"tokens of cache, {pages_for(longest, page)} pages of {page}"
        )
    per_slot = tuple(k for k, g in page_parts(graph.cache).items() if not g)
    return pages, page, longest, per_slot


def check_layout(graph, page: int) -> None:
    """Refuse a cache that cannot page, or pages that split its granules."""
    if graph.meta.get("mesh") is not None:
        raise ValueError("kv_pages= needs a cache on one device; this model's is sharded")
    granules = {g for g in page_parts(graph.cache).values() if g > 1}
    for g in granules:
        if page % g:
            raise ValueError(
                f"page_size={page} must be a multiple of the {graph.cache.kind} cache's "
                f"granule of {g} tokens"
            )


def default_page(layout) -> int:
    """PAGE_SIZE, or a layout's largest granule if larger (KIVI's group)."""
    return max([PAGE_SIZE, *page_parts(layout).values()])


def page_parts(layout) -> dict[str, int]:
    """name -> tokens per row of each cache array of a layout that can page: 1 for rows
    addressed by position, G for per-granule rows (KIVI's key scales), 0 for an array
    kept per slot (KIVI's staging ring, its first rows). ValueError for any other array
    (H2O's and the sinks' rows hold slots, not positions)."""
    parts = {}
    for name, shape, _ in layout.entries:
        rows = shape[2] if len(shape) >= 3 and shape[0] == "B" else None
        if rows == "S" and "S" not in shape[3:]:
            parts[name] = 1
        elif isinstance(rows, str) and rows.startswith("S/"):
            parts[name] = int(rows[2:])
        elif name.endswith((".res", ".first")) and rows is not None and "S" not in shape:
            parts[name] = 0
        else:
            raise ValueError(
                f"kv_pages= needs a cache of rows addressed by position (dense, int8, KIVI with "
                f"every position kept); this model's {layout.kind} cache has {name} {shape}"
            )
    return parts


def allocate(layout, pages: int, page: int, rows: int) -> dict:
    """A zeroed pool of `pages` pages of `page` tokens for a cache layout (arrays kept per
    slot: `rows` of them)."""
    parts = page_parts(layout)
    out = {}
    for k, s in layout.shapes(1, page).items():
        lead = pages if parts[k] else rows
        rest = (s.shape[1], page // parts[k], *s.shape[3:]) if parts[k] else s.shape[1:]
        out[k] = jnp.zeros((lead, *rest), s.dtype)
    return out
