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
from pallax.runtime.sampling import sample


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
