"""The Llama architecture (SmolLM2 et al.) written in pallax's semantic ops.

RMSNorm, rotary embeddings (rotate-half), grouped-query attention over a dense
KV cache, SwiGLU, tied embeddings. One function serves prefill, chunked prefill
and decode: `tokens` [B, T] are written at cache rows pos[b] .. pos[b] + T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallax.ir import primitives as ops
from pallax.model.configs import ModelConfig


def cache_shapes(cfg: ModelConfig) -> dict[str, tuple[str | int, ...]]:
    """The dense KV-cache layout: one [B, K, S, H] key and value array per layer."""
    shape = ("B", cfg.n_kv_heads, "S", cfg.head_dim)
    out = {}
    for i in range(cfg.n_layers):
        out[f"layers.{i}.k"] = shape
        out[f"layers.{i}.v"] = shape
    return out


def forward(cfg: ModelConfig, weights, cache, tokens, pos, logits_index=None):
    """Logits and the updated cache.

    tokens [B, T] int32, pos [B] int32 (cache row of tokens[:, 0]);
    logits_index [B] int32 selects one position per row (logits [B, V]);
    None returns logits for every position ([B, T, V]).
    """
    b, t = tokens.shape
    n, kv, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    positions = pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    x = ops.embed(tokens, weights["embed"])  # [B, T, D]
    new_cache = {}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        with jax.named_scope(f"layer_{i}"):
            hn = ops.rms_norm(x, weights[p + "attn_norm"], eps=cfg.norm_eps)
            q = ops.linear(hn, weights[p + "wq"]).reshape(b, t, n, h)
            k = ops.linear(hn, weights[p + "wk"]).reshape(b, t, kv, h)
            v = ops.linear(hn, weights[p + "wv"]).reshape(b, t, kv, h)
            q = ops.rope(q, positions, theta=cfg.rope_theta, scaling=cfg.rope_scaling)
            k = ops.rope(k, positions, theta=cfg.rope_theta, scaling=cfg.rope_scaling)
            o, new_cache[p + "k"], new_cache[p + "v"] = ops.attention(
                q, k, v, cache[p + "k"], cache[p + "v"], pos
            )
            x = x + ops.linear(o.reshape(b, t, n * h), weights[p + "wo"])
            hn = ops.rms_norm(x, weights[p + "ffn_norm"], eps=cfg.norm_eps)
            gate = ops.linear(hn, weights[p + "w_gate"])
            up = ops.linear(hn, weights[p + "w_up"])
            x = x + ops.linear(ops.mlp_act(gate, up, kind=cfg.mlp_kind), weights[p + "w_down"])
    if logits_index is not None:
        x = x[jnp.arange(b), logits_index][:, None, :]  # [B, 1, D]
    x = ops.rms_norm(x, weights["final_norm"], eps=cfg.norm_eps)
    table = weights["embed"] if cfg.tie_embeddings else weights["lm_head"]
    logits = ops.lm_head(x, table)
    if logits_index is not None:
        logits = logits[:, 0]
    return logits, new_cache


def logical_axes(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Each weight's dimensions by logical axis (sharding/rules.py maps them to a mesh).
    "q_heads" and "kv_heads" on a projection are heads x head_dim, head-major."""
    axes = {"embed": ("vocab", "embed"), "final_norm": ("embed",)}
    if not cfg.tie_embeddings:
        axes["lm_head"] = ("vocab", "embed")
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        axes.update({
            p + "attn_norm": ("embed",),
            p + "wq": ("q_heads", "embed"),
            p + "wk": ("kv_heads", "embed"),
            p + "wv": ("kv_heads", "embed"),
            p + "wo": ("embed", "q_heads"),
            p + "ffn_norm": ("embed",),
            p + "w_gate": ("mlp", "embed"),
            p + "w_up": ("mlp", "embed"),
            p + "w_down": ("embed", "mlp"),
        })  # fmt: skip
    return axes


# The axes of every KV-cache array: [B, K, ...] (compressed formats keep the first two).
CACHE_AXES = ("batch", "kv_heads")


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, h = cfg.dim, cfg.head_dim
    shapes = {"embed": (cfg.vocab_size, d), "final_norm": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attn_norm": (d,),
            p + "wq": (cfg.n_heads * h, d),
            p + "wk": (cfg.n_kv_heads * h, d),
            p + "wv": (cfg.n_kv_heads * h, d),
            p + "wo": (d, cfg.n_heads * h),
            p + "ffn_norm": (d,),
            p + "w_gate": (cfg.ffn_dim, d),
            p + "w_up": (cfg.ffn_dim, d),
            p + "w_down": (d, cfg.ffn_dim),
        })  # fmt: skip
    return shapes
