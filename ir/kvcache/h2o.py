"""H2O, heavy-hitter eviction (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models"): a budget of `budget` tokens per
layer, KV head and sequence, holding the `recent` newest ones and the tokens with the
largest accumulated attention.

Rows are a pool of granule slots (one token each for dense and int8, G for KIVI),
each with the start position of its granule (+1; 0 = empty, so a zero-filled cache is
empty) and its accumulated attention mass:

- every call the attention returns the mass each key received (summed over the
  call's real queries and the query heads sharing the KV head); row masses add to
  their slot's score, staged tokens' masses to theirs;
- granules leaving the format's staging compete with the pool: the pool keeps the
  `rows / G` highest scores (a granule's score is the sum over its tokens);
- the `recent` newest positions are always kept: with staging (KIVI) the staging ring
  is that window, so `recent` <= its residual and the pool holds
  `(budget - recent) / G * G` rows; without it they are ranked first.

Within a chunk the eviction happens once, after the chunk (the paper scores a prompt
with full attention, then keeps its heavy hitters); token by token it happens every
step. True positions are kept, so the context length bounds generation.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from pallax.ir.kvcache.format import rows_template
from pallax.ir.kvcache.policy import Policy

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class H2O(Policy):
    budget: int = 256
    recent: int = 0
    name = "h2o"
    needs_mass = True

    def check(self, fmt):
        if not fmt.staging:
            return
        g, r = fmt.granule, fmt.residual
        if self.recent > r:
            raise ValueError(
                f"evict_kv(h2o) with compress_kv: recent={self.recent} must be <= the KIVI "
                f"residual={r} (the residual is the window H2O always keeps)"
            )
        if (self.budget - self.recent) // g < 1:
            raise ValueError(
                f"evict_kv(h2o) with compress_kv: budget={self.budget} - recent={self.recent} "
                f"must hold at least one group of group_size={g} quantized tokens"
            )

    def rows(self, fmt):
        if not fmt.staging:
            return self.budget
        g = fmt.granule
        return (self.budget - self.recent) // g * g

    def parts(self, fmt, kv, rows):
        slots = rows_template(rows, fmt.granule)
        out = {
            "h2o.pos": (("B", kv, slots), "int32"),
            "h2o.score": (("B", kv, slots), "float32"),
        }
        if fmt.staging:
            out["h2o.res.score"] = (("B", kv, fmt.staging), "float32")
        return out

    def row_positions(self, fmt, state, stored, kv, rows):
        g = fmt.granule
        start = state["h2o.pos"] - 1  # [B, K, slots]
        pos = start[..., None] + jnp.arange(g, dtype=jnp.int32)
        pos = jnp.where(start[..., None] >= 0, pos, -1)
        return pos.reshape(*start.shape[:2], start.shape[2] * g)

    def add_mass(self, st, mass_rows, mass_ring):
        out = dict(st)
        slots = st["h2o.score"].shape[-1]
        out["h2o.score"] = st["h2o.score"] + mass_rows.reshape(
            *mass_rows.shape[:-1], slots, -1
        ).sum(-1)
        if "h2o.res.score" in st:
            out["h2o.res.score"] = st["h2o.res.score"] + mass_ring
        return out

    def stage_scores(self, st, take_new, mass_new_at_slot):
        out = dict(st)
        out["h2o.res.score"] = jnp.where(take_new[None], mass_new_at_slot, st["h2o.res.score"])
        return out

    def place(self, fmt, st, enc, starts, leaving, stored, end, scores):
        """One sequence: the pool and the leaving granules compete for the slots."""
        g = fmt.granule
        kv, slots = st["h2o.pos"].shape
        n_leave = starts.shape[0]
        lscore = scores.reshape(kv, n_leave, g).sum(-1)  # [K, L]
        start = st["h2o.pos"] - 1  # [K, slots]
        all_starts = jnp.concatenate([start, jnp.broadcast_to(starts, (kv, n_leave))], axis=1)
        real = jnp.concatenate([start >= 0, jnp.broadcast_to(leaving, (kv, n_leave))], axis=1)
        score = jnp.concatenate([st["h2o.score"], lscore], axis=1)
        rank = jnp.where(real, score, -jnp.inf)
        if not fmt.staging and self.recent:
            rank = jnp.where(real & (all_starts >= end - self.recent), jnp.inf, rank)
        top, keep = lax.top_k(rank, slots)  # [K, slots]
        kept = top > -jnp.inf

        def pick(pool, new, per_granule):
            if per_granule:
                both = jnp.concatenate([pool, new.astype(pool.dtype)], axis=1)
                idx = keep.reshape(keep.shape + (1,) * (both.ndim - 2))
                return jnp.take_along_axis(both, idx, axis=1)
            rest = pool.shape[2:]
            a = pool.reshape(kv, slots, g, *rest)
            b = new.astype(pool.dtype).reshape(kv, n_leave, g, *rest)
            both = jnp.concatenate([a, b], axis=1)
            idx = keep.reshape(keep.shape + (1,) * (both.ndim - 2))
            return jnp.take_along_axis(both, idx, axis=1).reshape(pool.shape)

        out = dict(st)
        for name, val in enc.items():
            out[name] = pick(st[name], val, name in fmt.granule_parts or g == 1)
        out["h2o.pos"] = jnp.where(kept, jnp.take_along_axis(all_starts, keep, axis=1) + 1, 0)
        out["h2o.score"] = jnp.where(kept, jnp.take_along_axis(score, keep, axis=1), 0.0)
        return out

    def __str__(self) -> str:
        return f"h2o(budget={self.budget}, recent={self.recent})"
