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

import jax
import jax.numpy as jnp

from pallax.ir.graph import Graph
from pallax.runtime.sampling import SamplingParams, greedy, pack, sample


def make_slot_decode(graph: Graph):
    """(weights, cache, tokens [B], pos [B], live [B], sampling, steps [B]) ->
    (next tokens [B], cache)."""

    def decode(weights, cache, tokens, pos, live, sampling, steps):
        last = jnp.where(live, 0, -1).astype(jnp.int32)
        logits, cache = graph.run("prefill", weights, cache, tokens[:, None], pos, last)
        return sample(logits, sampling, steps), cache

    return jax.jit(decode, donate_argnums=(1,))


def make_slot_prefill(graph: Graph, slots: int):
    """(weights, cache, rows [P], fresh [P], tokens [P, T], pos [P], last [P], sampling)
    -> (a token sampled after each row's last real token [P], cache). Rows index the
    slot cache; a row >= `slots` is padding."""

    def prefill(weights, cache, rows, fresh, tokens, pos, last, sampling):
        src = jnp.where(fresh, slots, rows)  # out of range: gathers zeros
        sub = {k: jnp.take(v, src, axis=0, mode="fill", fill_value=0) for k, v in cache.items()}
        logits, sub = graph.run("prefill", weights, sub, tokens, pos, last)
        cache = {k: v.at[rows].set(sub[k], mode="drop") for k, v in cache.items()}
        return sample(logits, sampling, jnp.int32(0)), cache

    return jax.jit(prefill, donate_argnums=(1,))


def make_slot_verify(graph: Graph):
    """Speculative verification with the decode method: (weights, cache, tokens [B, K+1]
    (each slot's last token and K drafted ones), pos [B], sampling, steps [B]) -> (the
    token sampled after the last token [B], the greedy token after each of the K+1 [B, K+1],
    cache).

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
    rules = {p: rows for p in per_row} | {ops.attention_p: attention}

    def verify(weights, cache, tokens, pos, sampling, steps):
        flat = jax.tree.leaves((weights, cache, tokens, pos))
        outs = eval_with_rules(step.jaxpr.jaxpr, step.jaxpr.consts, flat, rules)
        logits, cache = jax.tree.unflatten(step.out_tree, outs)  # [B, K+1, V]
        first = sample(logits[:, 0], sampling, steps)
        return first, jax.vmap(greedy, in_axes=1, out_axes=1)(logits), cache

    return jax.jit(verify, donate_argnums=(1,))


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


def pack_slots(params, b):
    """Sampling parameters per slot (None: a free slot, greedy)."""
    return pack([p if p is not None else SamplingParams(seed=0) for p in params], b)


def check_batch_axis(graph, s: int) -> None:
    """Slots are gathered and scattered along axis 0 of every cache array."""
    one, two = graph.cache.shapes(1, s), graph.cache.shapes(2, s)
    for name in one:
        if one[name].shape[0] != 1 or two[name].shape[1:] != one[name].shape[1:]:
            raise ValueError(f"cache array {name} {two[name].shape} is not batch-major")
