"""Gemma 3 (text) written in pallax's semantic ops.

What differs from Llama, as in the reference implementation:
- layers alternate local sliding-window attention (window `sliding_window`,
  RoPE base `rope_local_theta`) and global attention (RoPE base `rope_theta`,
  with the checkpoint's position scaling); `layer_types` says which is which;
- RMSNorm on queries and keys per head (QK-norm) before RoPE;
- four norms per block: before and after attention, before and after the MLP
  ("sandwich" norms), each residual added after its post-norm;
- GeGLU with the tanh approximation of GELU;
- embeddings scaled by sqrt(dim); attention scaled by query_pre_attn_scalar**-0.5;
- the LM head tied to the 262k-entry embedding table.

Norm weights are stored as Gemma's `1 + w` multiplier (the GGUF already holds
it; the HF loader adds the 1), so `rms_norm` is the same op as Llama's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallax.ir import primitives as ops
from pallax.model import llama
from pallax.model.configs import ModelConfig


def cache_shapes(cfg: ModelConfig) -> dict[str, tuple[str | int, ...]]:
    """One [B, K, S, H] key and value array per layer, as Llama (local layers mask to their
    window)."""
    return llama.cache_shapes(cfg)


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Llama's weights plus QK-norm and the two post-norms of each block."""
    shapes = llama.weight_shapes(cfg)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "q_norm": (cfg.head_dim,),
            p + "k_norm": (cfg.head_dim,),
            p + "post_attn_norm": (cfg.dim,),
            p + "post_ffn_norm": (cfg.dim,),
        })  # fmt: skip
    return shapes


CACHE_AXES = llama.CACHE_AXES


def logical_axes(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Llama's axes plus the per-head QK-norms (over head_dim) and the post-norms."""
    axes = llama.logical_axes(cfg)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        axes.update({
            p + "q_norm": ("head_dim",),
            p + "k_norm": ("head_dim",),
            p + "post_attn_norm": ("embed",),
            p + "post_ffn_norm": ("embed",),
        })  # fmt: skip
    return axes


def forward(cfg: ModelConfig, weights, cache, tokens, pos, logits_index=None):
    """Logits and the updated cache; the signature of `llama.forward`."""
    b, t = tokens.shape
    n, kv, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    eps = cfg.norm_eps
    positions = pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    x = ops.embed(tokens, weights["embed"], scale=cfg.embed_scale)
    new_cache = {}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        local = cfg.layer_type(i) == "sliding"
        if local:
            theta, scaling, window = cfg.rope_local_theta or cfg.rope_theta, 1.0, cfg.sliding_window
        else:
            theta, scaling, window = cfg.rope_theta, cfg.rope_scaling, None
        with jax.named_scope(f"layer_{i}_{'local' if local else 'global'}"):
            hn = ops.rms_norm(x, weights[p + "attn_norm"], eps=eps)
            q = ops.linear(hn, weights[p + "wq"]).reshape(b, t, n, h)
            k = ops.linear(hn, weights[p + "wk"]).reshape(b, t, kv, h)
            v = ops.linear(hn, weights[p + "wv"]).reshape(b, t, kv, h)
            q = ops.rms_norm(q, weights[p + "q_norm"], eps=eps)
            k = ops.rms_norm(k, weights[p + "k_norm"], eps=eps)
            q = ops.rope(q, positions, theta=theta, scaling=scaling)
            k = ops.rope(k, positions, theta=theta, scaling=scaling)
            o, new_cache[p + "k"], new_cache[p + "v"] = ops.attention(
                q,
                k,
                v,
                cache[p + "k"],
                cache[p + "v"],
                pos,
                scale=cfg.attention_scale(),
                sliding_window=window,
                softcap=cfg.attn_softcap,
            )
            o = ops.linear(o.reshape(b, t, n * h), weights[p + "wo"])
            x = x + ops.rms_norm(o, weights[p + "post_attn_norm"], eps=eps)
            hn = ops.rms_norm(x, weights[p + "ffn_norm"], eps=eps)
            gate = ops.linear(hn, weights[p + "w_gate"])
            up = ops.linear(hn, weights[p + "w_up"])
            y = ops.linear(ops.mlp_act(gate, up, kind="geglu_tanh"), weights[p + "w_down"])
            x = x + ops.rms_norm(y, weights[p + "post_ffn_norm"], eps=eps)
    if logits_index is not None:
        x = x[jnp.arange(b), logits_index][:, None, :]  # [B, 1, D]
    x = ops.rms_norm(x, weights["final_norm"], eps=eps)
    table = weights["embed"] if cfg.tie_embeddings else weights["lm_head"]
    logits = ops.lm_head(x, table, softcap=cfg.final_softcap)
    if logits_index is not None:
        logits = logits[:, 0]
    return logits, new_cache
