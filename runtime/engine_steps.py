"""The serving engine's compiled steps over a cache of request slots.

Both steps are the graph's "prefill" step, whose `last` index also says how many of a
row's tokens are real (`ir.kv_rewrite.valid_tokens`):

- decode: every slot at once, one token each (T = 1, so every op takes its decode
  method, as in `generate`'s loop); a slot that is not decoding gets `last = -1`, so
  a compressed or evicting cache leaves it untouched, and a dense cache writes only
  past the slot's last real position, which nothing reads before it is written again;
- prefill: one prompt chunk of T > 1 tokens for a few slots, gathered from the slot
  cache (a request's first chunk starts from zeros, as a fresh cache does) and
  scattered back; rows past the slot count are padding and are dropped.

A request's prompt tokens therefore always run the prefill method and its generated
tokens the decode method, whatever runs beside it, so with batch invariance
(`ir.primitives.base.BATCH_INVARIANT`) its tokens are those of `generate` alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallax.ir.graph import Graph
from pallax.runtime.sampling import SamplingParams, filtered_logits, greedy, pack, sample


class SlotSteps:
    """An engine's compiled steps for its shapes (`rows` decode slots, `chunk_rows` prompt
    rows, `cache_len` tokens), built on first use and kept in the CompiledModel's cache.
    With `paged=(pages, page_size)` the cache is a pool of pages and block tables
    (runtime/kv_pages.py)."""

    def __init__(self, compiled, rows: int, chunk_rows: int, cache_len: int, paged=None):
        self.c, self.b, self.p, self.s = compiled, rows, chunk_rows, cache_len
        self.paged = paged
        self.page = paged[1] if paged else 0

    def _graph(self, rows: int, t: int, name: str = "prefill") -> Graph:
        from pallax.ir.graph import StepSpec

        build = lambda: self.c._capture([StepSpec(name, rows, t, self.s)])  # noqa: E731
        return self.c._timed(("engine-graph", name, rows, t, self.s), build)

    def decode(self):
        """(the decode step's graph, `make_slot_decode`)."""

        def build():
            graph = self._graph(self.b, 1)
            check_batch_axis(graph, self.s)
            return graph, make_slot_decode(graph, self.page)

        return self.c._timed(("engine-decode", self.b, self.s, self.page), build)

    def alloc(self):
        from pallax.runtime.compiled import _allocate

        if self.paged:
            from pallax.runtime.kv_pages import allocate

            pages, page = self.paged
            table = jnp.full((self.b, self.s // page), pages, jnp.int32)
            pool = allocate(self.decode()[0].cache, pages, page, self.b)
            return {"pool": pool, "table": table}
        return _allocate(self.decode()[0], self.b, self.s)

    def prefill(self, t: int):
        build = lambda: make_slot_prefill(self._graph(self.p, t), self.b, self.page)  # noqa: E731

        return self.c._timed(("engine-prefill", self.p, t, self.s, self.b, self.page), build)

    def draft(self, k: int, steps: int):
        build = lambda: make_slot_draft(self._graph(self.b, 1), k, steps)  # noqa: E731
        return self.c._timed(("engine-draft", self.b, k, steps, self.s), build)

    def verify(self, t: int):
        build = lambda: make_slot_verify(self._graph(self.b, t, "chunk"), self.page)  # noqa: E731
        return self.c._timed(("engine-verify", self.b, t, self.s, self.page), build)


def page_pool_size(pool: dict, per_slot) -> int:
    """The number of pages of a paged cache's pool (its arrays but the per-slot ones)."""
    return next(v.shape[0] for k, v in pool.items() if k not in per_slot)


def _runner(graph: Graph, page: int):
    """`graph.run` of the "prefill" step, over a paged cache when `page` is set."""
    if not page:
        return lambda weights, cache, *args: graph.run("prefill", weights, cache, *args)
    from pallax.runtime.kv_pages import paged_run

    return lambda weights, cache, *args: paged_run(graph, "prefill", page, weights, cache, *args)


def make_slot_decode(graph: Graph, page: int = 0):
    """(weights, cache, tokens [B], pos [B], live [B], sampling, steps [B], prev [B],
    ahead [B]) -> (next tokens [B], cache). A slot with `ahead` feeds `prev[slot]` (the
    previous step's token, still on the device) instead of `tokens[slot]`."""

    run = _runner(graph, page)

    def decode(weights, cache, tokens, pos, live, sampling, steps, prev, ahead):
        tokens = jnp.where(ahead, prev, tokens)
        last = jnp.where(live, 0, -1).astype(jnp.int32)
        logits, cache = run(weights, cache, tokens[:, None], pos, last)
        return sample(logits, sampling, steps), cache

    return jax.jit(decode, donate_argnums=(1,))


def make_slot_draft(graph: Graph, k: int, steps: int):
    """A draft model's `k` greedy tokens per slot in one call of `steps` decode steps:
    (weights, cache, queue [B, steps - k + 1], qlen [B], pos [B], live [B]) -> (drafts
    [B, k], cache). A live slot feeds its `qlen` queued tokens (the tokens its cache
    lacks, its last one last) from position `pos`, then its own drafts; it writes
    `qlen - 1 + k` positions and is idle after (`last = -1`, as a slot that is not
    decoding is throughout, writing only at and past `pos`)."""

    def draft(weights, cache, queue, qlen, pos, live):
        def step(carry, i):
            cache, prev = carry
            tok = jnp.where(i < qlen, queue[:, jnp.minimum(i, queue.shape[1] - 1)], prev)
            on = live & (i < qlen - 1 + k)
            last = jnp.where(on, 0, -1).astype(jnp.int32)
            logits, cache = graph.run("prefill", weights, cache, tok[:, None], pos + i, last)
            nxt = greedy(logits)
            return (cache, nxt), nxt

        (cache, _), outs = jax.lax.scan(step, (cache, jnp.zeros_like(qlen)), jnp.arange(steps))
        at = jnp.clip(qlen[:, None] - 1, 0, None) + jnp.arange(k)[None, :]
        return jnp.take_along_axis(outs.T, jnp.minimum(at, steps - 1), axis=1), cache

    return jax.jit(draft, donate_argnums=(1,))


def make_slot_prefill(graph: Graph, slots: int, page: int = 0):
    """(weights, cache, rows [P], fresh [P], tokens [P, T], pos [P], last [P], sampling)
    -> (a token sampled after each row's last real token [P], cache). Rows index the
    slot cache; a row >= `slots` is padding. A paged cache is not gathered: the rows'
    block tables are (a fresh row's pages hold stale KV past its positions, which a
    position-addressed cache never reads)."""
    if page:
        run = _runner(graph, page)

        from pallax.runtime.kv_pages import page_parts

        per_slot = [k for k, g in page_parts(graph.cache).items() if not g]  # KIVI's ring

        def paged(weights, cache, rows, fresh, tokens, pos, last, sampling):
            table, pool = cache["table"], dict(cache["pool"])
            none = page_pool_size(pool, per_slot)  # a page id past the pool: no page
            mine = jnp.take(table, rows, axis=0, mode="fill", fill_value=none)
            src = jnp.where(fresh, slots, rows)  # per-slot arrays as the slot cache's rows
            sub = {k: jnp.take(pool[k], src, axis=0, mode="fill", fill_value=0) for k in per_slot}
            logits, out = run(weights, {"pool": pool | sub, "table": mine}, tokens, pos, last)
            pool = out["pool"] | {k: pool[k].at[rows].set(out["pool"][k], mode="drop")
                                  for k in per_slot}  # fmt: skip
            return sample(logits, sampling, jnp.int32(0)), {"pool": pool, "table": table}

        return jax.jit(paged, donate_argnums=(1,))

    def prefill(weights, cache, rows, fresh, tokens, pos, last, sampling):
        src = jnp.where(fresh, slots, rows)  # out of range: gathers zeros
        sub = {k: jnp.take(v, src, axis=0, mode="fill", fill_value=0) for k, v in cache.items()}
        logits, sub = graph.run("prefill", weights, sub, tokens, pos, last)
        cache = {k: v.at[rows].set(sub[k], mode="drop") for k, v in cache.items()}
        return sample(logits, sampling, jnp.int32(0)), cache

    return jax.jit(prefill, donate_argnums=(1,))


def make_slot_verify(graph: Graph, page: int = 0):
    """Speculative verification with the decode method: (weights, cache, tokens [B, K+1]
    (each slot's last token and K drafted ones), pos [B], sampling, steps [B], n_draft [B]
    real drafts) -> (a sampling row's drafts kept [B] and the token after them [B]
    (`speculative_sample`), the greedy token after each of the K+1 [B, K+1], cache).

    The graph's "chunk" step at K+1 tokens, evaluated so that every token takes exactly
    the path of a decode step: the projections, norms and the LM head see B x (K+1) rows of
    one token each (their decode method, which reduces each row in an order fixed by the
    row), and attention runs once per token, each over the cache its predecessors wrote.
    So a greedy token here is the token sequential decoding gives, bit for bit; the KV of
    rejected drafts lands past the row's position, where a position-addressed cache
    never reads before writing again."""
    from pallax.ir import primitives as ops
    from pallax.ir.rewrite import eval_with_rules

    step = graph.steps["chunk"]

    def rows(eqn, *args):
        x = args[0]
        if x.ndim < 3:
            return eqn.primitive.bind(*args, **eqn.params)
        b, t = x.shape[:2]
        acts = len(args) if eqn.primitive is ops.mlp_act_p else 1  # gate, up; else x alone
        args = [a.reshape(b * t, 1, *a.shape[2:]) for a in args[:acts]] + list(args[acts:])
        y = eqn.primitive.bind(*args, **eqn.params)
        return y.reshape(b, t, *y.shape[2:])

    def attention(eqn, q, k, v, pos, valid, *cache):
        outs = []
        for j in range(q.shape[1]):
            one = jnp.clip(valid - j, 0, 1).astype(valid.dtype)
            res = ops.attention_p.bind(q[:, j : j + 1], k[:, j : j + 1], v[:, j : j + 1],
                                       pos + j, one, *cache, **eqn.params)  # fmt: skip
            outs.append(res[0])
            cache = res[1:]
        return [jnp.concatenate(outs, axis=1), *cache]

    per_row = (ops.linear_p, ops.qlinear_p, ops.lm_head_p, ops.rms_norm_p, ops.mlp_act_p)
    rules = {p: rows for p in per_row}

    def verify(weights, cache, tokens, pos, sampling, steps, n_draft):
        step_rules = rules | {ops.attention_p: attention}
        if page:  # one gather of each layer's pages, K + 1 tokens on it, one write back
            from pallax.runtime.kv_pages import paged_rule

            table, cache = cache["table"], cache["pool"]
            step_rules[ops.attention_p] = paged_rule(table, page, attention)
        flat = jax.tree.leaves((weights, cache, tokens, pos))
        outs = eval_with_rules(step.jaxpr.jaxpr, step.jaxpr.consts, flat, step_rules)
        logits, cache = jax.tree.unflatten(step.out_tree, outs)  # [B, K+1, V]
        if page:
            cache = {"pool": cache, "table": table}
        b = tokens.shape[0]
        kept, after = jax.lax.cond(
            jnp.any(sampling["temperature"] > 0),
            lambda: speculative_sample(logits, tokens[:, 1:], n_draft, sampling, steps),
            lambda: (jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32)),
        )
        return kept, after, jax.vmap(greedy, in_axes=1, out_axes=1)(logits), cache

    return jax.jit(verify, donate_argnums=(1,))


def speculative_sample(logits, drafts, n_draft, sampling, steps):
    """Rejection sampling of drafts proposed with certainty (prompt lookup): logits
    [B, K+1, V], drafts [B, K] of which the first n_draft [B] are real -> (drafts kept
    [B], the token after them [B]).

    Draft j is kept with probability p_j(d_j), p_j being the row's sampling distribution
    (temperature, top-k, top-p, min-p) after the tokens before it; at the first rejection
    the next token is drawn from p_j without d_j, renormalized, and after every real
    draft is kept from p at the next position. So each token is distributed exactly as
    when sampled one at a time (speculative sampling with a point-mass proposal)."""
    b, t, v = logits.shape
    rows = {k: jnp.repeat(x, t, axis=0) for k, x in sampling.items()}
    masked = filtered_logits(logits.reshape(b * t, v), rows).reshape(b, t, v)
    probs = jax.nn.softmax(masked, axis=-1)
    base = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(sampling["seed"], steps)
    j = jnp.arange(t - 1)
    u = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.uniform(
        jax.random.fold_in(k, 2 * i)))(j))(base)  # fmt: skip
    p_draft = jnp.take_along_axis(probs[:, :-1], drafts[..., None], axis=-1)[..., 0]
    ok = (u < p_draft) & (j[None, :] < n_draft[:, None])
    kept = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [B]
    at = jnp.take_along_axis(probs, kept[:, None, None], axis=1)[:, 0]  # [B, V]
    rejected = kept < n_draft
    bad = jnp.take_along_axis(drafts, jnp.minimum(kept, t - 2)[:, None], axis=1)[:, 0]
    at = jnp.where(rejected[:, None] & (jnp.arange(v)[None, :] == bad[:, None]), 0.0, at)
    keys = jax.vmap(lambda k, i: jax.random.fold_in(k, 2 * i + 1))(base, kept)
    after = jax.vmap(jax.random.categorical)(keys, jnp.log(at))
    return kept.astype(jnp.int32), after.astype(jnp.int32)


def prompt_lookup(ids: list[int], k: int, longest: int = 3) -> list[int]:
    """Up to `k` tokens drafted by prompt lookup: the tokens that followed the latest
    earlier occurrence of the context's last n-gram (n from `longest` down to 1)."""
    n_ids = len(ids)
    for n in range(min(longest, n_ids - 1), 0, -1):
        tail = ids[n_ids - n :]
        for i in range(n_ids - n - 1, -1, -1):
            if ids[i : i + n] == tail:
                return ids[i + n : i + n + k]
    return []


MIN_CHUNK = 16  # a prompt chunk has T > 1, so its tokens take the prefill method
MAX_CHUNK = 512


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def chunk_args(ids, start: int, n: int, slot: int, p: int, slots: int, cache_len: int):
    """(tokens taken, chunk length T, `make_slot_prefill`'s arguments but the sampling)
    for up to `n` tokens of `ids` from position `start` into `slot`, in row 0 of `p`."""
    t = min(max(MIN_CHUNK, pow2(n)), MAX_CHUNK)
    while start + t > cache_len:  # the chunk's padding stays inside the cache
        t //= 2
    n = min(n, t)
    tokens = np.zeros((p, t), np.int32)
    tokens[0, :n] = ids[start : start + n]
    rows = np.full((p,), slots, np.int32)  # past the slots: padding
    rows[0] = slot
    last = np.full((p,), -1, np.int32)
    last[0] = n - 1
    pos = np.zeros((p,), np.int32)
    pos[0] = start
    fresh = np.ones((p,), bool)
    fresh[0] = start == 0
    return n, t, (rows, fresh, tokens, pos, last)


CACHE_ROUND = 256  # slot caches are whole multiples of this many tokens
MAX_DRAFT = 16


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def positive_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class EngineShape:
    """An engine's limits (`max_batch` slots of `max_len` tokens, `token_budget` tokens a
    step, `speculate` drafted tokens) and the shapes of its steps: `rows` decode slots,
    `chunk_rows` prompt rows, caches of `cache_len` tokens."""

    max_batch: int
    token_budget: int
    max_len: int
    speculate: int
    rows: int
    chunk_rows: int
    cache_len: int

    @classmethod
    def plan(cls, *, max_batch=8, token_budget=256, max_len=None, speculate=0, context: int,
             min_batch: int = 1, data: int = 1) -> EngineShape:  # fmt: skip
        """The shape for these limits on a model of `context` tokens whose batches are at
        least `min_batch` and multiples of `data`; bad limits are refused by name."""
        max_batch = positive_int("max_batch", max_batch)
        if max_batch % data:
            raise ValueError(f"max_batch={max_batch} must be a multiple of data={data}")
        token_budget = positive_int("token_budget", token_budget)
        if token_budget < max_batch + MIN_CHUNK:
            raise ValueError(
                f"token_budget={token_budget} must be at least max_batch + {MIN_CHUNK} = "
                f"{max_batch + MIN_CHUNK}: every decoding request takes one token of a step "
                f"and a prompt chunk at least {MIN_CHUNK}"
            )
        max_len = min(1024, context) if max_len is None else positive_int("max_len", max_len, 2)
        if max_len > context:
            raise ValueError(f"max_len={max_len} is longer than the context length {context}")
        speculate = positive_int("speculate", speculate, 0)
        if speculate > MAX_DRAFT:
            raise ValueError(f"speculate={speculate} must be at most {MAX_DRAFT} drafted tokens")
        rows = _round_up(max(max_batch, min_batch), data)
        chunk_rows = _round_up(max(1, min_batch), data)
        # room past max_len for the drafts of a request's last verification
        cache_len = max(min(_round_up(max_len + speculate, CACHE_ROUND), context), max_len)
        return cls(max_batch, token_budget, max_len, speculate, rows, chunk_rows, cache_len)

    def chunk_lengths(self, whole: bool) -> tuple[int, ...]:
        """Every prompt chunk length `chunk_args` can pick (`whole`: H2O's chunks, which
        take up to MAX_CHUNK tokens whatever the budget)."""
        top = MAX_CHUNK if whole else min(max(MIN_CHUNK, pow2(self.token_budget)), MAX_CHUNK)
        top = min(top, pow2(self.cache_len + 1) // 2)  # halved until it fits the cache
        return tuple(1 << i for i in range(top.bit_length()))


def pack_slots(params, b):
    """Sampling parameters per slot (None: a free slot, greedy)."""
    return pack([p if p is not None else SamplingParams(seed=0) for p in params], b)


def check_batch_axis(graph, s: int) -> None:
    """Slots are gathered and scattered along axis 0 of every cache array."""
    one, two = graph.cache.shapes(1, s), graph.cache.shapes(2, s)
    for name in one:
        if one[name].shape[0] != 1 or two[name].shape[1:] != one[name].shape[1:]:
            raise ValueError(f"cache array {name} {two[name].shape} is not batch-major")
