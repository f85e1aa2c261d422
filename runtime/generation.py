"""Compiled prefill, decode loop and scoring functions over a captured Graph.

The decode loop runs on device (`lax.while_loop`) for a given number of steps
from a state that holds the cache, so `generate` runs it once and `stream` runs
it one step at a time, both through the same compiled executable. The cache is
donated and updated in place.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import export, lax

from pallax.ir.graph import Graph
from pallax.runtime.sampling import sample


class DecodeState(NamedTuple):
    cache: dict
    token: jax.Array  # [B] last sampled token, not yet in the cache
    pos: jax.Array  # [B] its position
    out: jax.Array  # [B, N] generated tokens
    count: jax.Array  # [B] tokens generated so far
    done: jax.Array  # [B] bool
    step: jax.Array  # [] int32, number of sampled tokens (first one included)


export.register_namedtuple_serialization(DecodeState, serialized_name="pallax.DecodeState")


def make_prefill(graph: Graph):
    """(weights, cache, tokens [B,T], pos [B], last [B]) -> (logits [B,V], cache)."""

    def prefill(weights, cache, tokens, pos, last):
        return graph.run("prefill", weights, cache, tokens, pos, last)

    return jax.jit(prefill, donate_argnums=(1,))


def _is_stop(tokens, stop_ids):
    return jnp.any(tokens[:, None] == stop_ids, axis=-1)  # stop_ids [B, M], -1 padded


@jax.jit
def first_token(logits, sampling, stop_ids, max_new):
    tok = sample(logits, sampling, jnp.int32(0))
    done = _is_stop(tok, stop_ids) | (max_new <= 1)
    return tok, done


def init_state(cache, first, done, prompt_lens, out_len) -> DecodeState:
    b = first.shape[0]
    out = jnp.zeros((b, out_len), jnp.int32).at[:, 0].set(first)
    return DecodeState(
        cache=cache,
        token=first,
        pos=prompt_lens.astype(jnp.int32),
        out=out,
        count=jnp.ones((b,), jnp.int32),
        done=done,
        step=jnp.int32(1),
    )


def make_decode_loop(graph: Graph):
    """(weights, state, sampling, stop_ids, max_new, n_steps) -> state after <= n_steps."""

    def loop(weights, state: DecodeState, sampling, stop_ids, max_new, n_steps):
        limit = state.step + n_steps

        def cond(s: DecodeState):
            return (s.step < limit) & ~jnp.all(s.done)

        def body(s: DecodeState):
            logits, cache = graph.run("decode", weights, s.cache, s.token[:, None], s.pos)
            nxt = sample(logits, sampling, s.step)
            nxt = jnp.where(s.done, 0, nxt)
            live = ~s.done
            out = lax.dynamic_update_slice(s.out, nxt[:, None], (jnp.int32(0), s.step))
            count = s.count + live.astype(jnp.int32)
            done = s.done | (live & (_is_stop(nxt, stop_ids) | (count >= max_new)))
            pos = s.pos + live.astype(jnp.int32)
            return DecodeState(
                cache, jnp.where(live, nxt, s.token), pos, out, count, done, s.step + 1
            )

        return lax.while_loop(cond, body, state)

    return jax.jit(loop, donate_argnums=(1,))


def make_score_chunk(graph: Graph):
    """(weights, cache, tokens [B,T], pos [B], targets [B,T]) -> (logprobs [B,T], cache)."""

    def chunk(weights, cache, tokens, pos, targets):
        logits, cache = graph.run("chunk", weights, cache, tokens, pos)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], cache

    return jax.jit(chunk, donate_argnums=(1,))
