"""Read a GGUF file: the model config from its metadata, float weights from its tensors.

llama.cpp's converter permutes the rows of the Q and K projections so that rotary
pairs are interleaved; pallax uses the rotate-half layout of the original
checkpoints, so the permutation is undone here.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from pallax.model.configs import SUPPORTED_ARCHITECTURES, ModelConfig
from pallax.model.gguf_file import GGUFFile


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The open GGUF file, or a clear error for a missing, non-GGUF or truncated file."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; expected a .gguf file")
    return GGUFFile(path)


def field(reader: GGUFFile, key: str, default=None):
    return reader.get(key, default)


def config_from_gguf(reader, name: str = "") -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}"
        )

    def get(key, default=None):
        value = field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    dim = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_heads))
    head_dim = int(get("attention.key_length", dim // n_heads))
    names = {t.name for t in reader.tensors}
    scaling_type = field(reader, f"{arch}.rope.scaling.type", "none")
    scaling = 1.0
    if scaling_type == "linear":
        scaling = float(field(reader, f"{arch}.rope.scaling.factor", 1.0))
    elif scaling_type not in ("none", None):
        raise ValueError(
            f"rope scaling type {scaling_type!r} is not supported; allowed: none, linear"
        )
    if "rope_freqs.weight" in names:
        raise ValueError(
            "GGUF has per-frequency rope factors (rope_freqs.weight), not supported yet"
        )
    vocab = field(reader, f"{arch}.vocab_size") or len(field(reader, "tokenizer.ggml.tokens", []))
    n_layers = int(get("block_count"))
    extra = {}
    if arch == "gemma3":
        extra = _gemma3_extras(reader, n_layers, dim, n_heads, head_dim)
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=int(get("feed_forward_length")),
        context_length=int(get("context_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in names,
        mlp_kind="geglu_tanh" if arch == "gemma3" else "swiglu",
        name=name or str(field(reader, "general.name", "")),
        **extra,
    )


GEMMA3_SLIDING_PATTERN = 6  # every 6th layer is global (llama.cpp and HF default)
GEMMA3_LOCAL_ROPE_THETA = 10000.0


def _gemma3_extras(reader, n_layers, dim, n_heads, head_dim) -> dict:
    """What a Gemma 3 GGUF leaves implicit, filled in as llama.cpp and transformers do."""
    window = field(reader, "gemma3.attention.sliding_window")
    if window is None:
        raise ValueError("Gemma 3 GGUF lacks gemma3.attention.sliding_window")
    pattern = field(reader, "gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == n_layers:
        layer_types = tuple("sliding" if p else "global" for p in pattern)
    else:
        period = int(pattern) if isinstance(pattern, int) and pattern > 0 else None
        period = period or GEMMA3_SLIDING_PATTERN
        layer_types = tuple("sliding" if (i + 1) % period else "global" for i in range(n_layers))
    # Gemma 3 27B scales queries by (dim / heads) ** -0.5, the others by head_dim ** -0.5.
    scalar = dim // n_heads if n_layers == 62 else head_dim
    attn_cap = field(reader, "gemma3.attn_logit_softcapping")
    final_cap = field(reader, "gemma3.final_logit_softcapping")
    return dict(
        layer_types=layer_types,
        sliding_window=int(window),
        rope_local_theta=GEMMA3_LOCAL_ROPE_THETA,
        query_pre_attn_scalar=float(scalar),
        embed_scale=float(dim) ** 0.5,
        qk_norm=True,
        attn_softcap=None if attn_cap is None else float(attn_cap),
        final_softcap=None if final_cap is None else float(final_cap),
    )


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of rotary pairs; w is [out, in]."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_rows(w, n_heads: int):
    """_unpermute on a float matrix, or on every per-row array of a packed weight (groups
    run along the input axis, so whole rows move together)."""
    from pallax.ir.qformat import QuantizedWeight

    if not isinstance(w, QuantizedWeight):
        return _unpermute(w, n_heads)
    return dataclasses.replace(
        w,
        **{
            f: _unpermute(getattr(w, f), n_heads)
            for f in ("data", "scale", "offset")
            if getattr(w, f) is not None
        },  # fmt: skip
    )


_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "wq",
    "attn_k": "wk",
    "attn_v": "wv",
    "attn_output": "wo",
    "ffn_norm": "ffn_norm",
    "attn_q_norm": "q_norm",
    "attn_k_norm": "k_norm",
    "post_attention_norm": "post_attn_norm",
    "post_ffw_norm": "post_ffn_norm",
    "ffn_gate": "w_gate",
    "ffn_up": "w_up",
    "ffn_down": "w_down",
}


def weights_from_gguf(
    reader,
    cfg: ModelConfig,
    origin: str = "GGUF",
    *,
    keep_quantized: bool = False,
    lazy: bool = False,
) -> dict:
    """pallax weight names -> float32 arrays; linear weights as [out, in].

    Only Llama GGUFs carry llama.cpp's Q/K row permutation (its converter applies
    it to Llama-family models alone), so only they are un-permuted.

    keep_quantized: every 2-D quantized tensor (the linears and the embedding table)
    becomes a `QuantizedWeight` copied from the file's blocks without a float round
    trip (model/gguf_quant.py); norms and float tensors stay float32.

    lazy: every tensor a `ir.lazy.LazyWeight` over the mapped file, read where placed.
    """
    weights: dict[str, np.ndarray] = {}
    unknown = []
    for t in reader.tensors:
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            key = "embed"
        elif t.name == "output_norm.weight":
            key = "final_norm"
        elif t.name == "output.weight":
            key = "lm_head"
        elif (
            len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit()
            and parts[2] in _LAYER_NAMES and parts[3] == "weight"
        ):  # fmt: skip
            key = f"layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
        else:
            unknown.append(t.name)
            continue
        arr = None
        if keep_quantized and len(t.shape) == 2:
            from pallax.model import gguf_quant

            try:
                arr = gguf_quant.keep_quantized(reader.raw(t), t.ggml_type, tuple(t.shape))
            except ValueError as e:
                msg = f"{origin}: tensor {t.name!r} cannot be kept quantized: {e}"
                raise ValueError(msg) from None
        if arr is None and lazy:
            from pallax.ir import lazy as lazy_weights

            arr = lazy_weights.from_gguf(reader, t, key)
        if arr is None:
            arr = reader.dequantize(t)
        heads = {".wq": cfg.n_heads, ".wk": cfg.n_kv_heads}.get(key[-3:])
        if cfg.arch == "llama" and heads is not None:
            if lazy:  # the same row order, read as placed
                order = _unpermute(np.arange(arr.shape[0]), heads)
                arr = arr.gather(order, 0, 1)
            else:
                arr = _unpermute_rows(arr, heads)
        weights[key] = arr
    if unknown:
        raise ValueError(
            f"{origin}: tensors pallax's {cfg.arch} does not use (biases or another "
            f"architecture?): {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    from pallax.model.architectures import check_weights

    check_weights(weights, cfg, origin)
    return weights
