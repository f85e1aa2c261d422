"""Read a GGUF file: the model config from its metadata, float weights from its tensors.

llama.cpp's converter permutes the rows of the Q and K projections so that rotary
pairs are interleaved; pallax uses the rotate-half layout of the original
checkpoints, so the permutation is undone here.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from pallax.model.configs import SUPPORTED_ARCHITECTURES, ModelConfig

GGUF_MAGIC = b"GGUF"


def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader`, or a clear error for a missing or non-GGUF file."""
    import gguf

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; expected a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{str(path)!r} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # a truncated or corrupt file
        raise ValueError(f"could not read GGUF file {str(path)!r}: {e}") from e


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


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
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=int(get("feed_forward_length")),
        context_length=int(get("context_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in names,
        name=name or str(field(reader, "general.name", "")),
    )


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of rotary pairs; w is [out, in]."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
    """Float32 array in numpy (row-major) order for one GGUF tensor."""
    from gguf import quants

    shape = tuple(int(d) for d in reversed(tensor.shape))
    data = quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(shape)


_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "wq",
    "attn_k": "wk",
    "attn_v": "wv",
    "attn_output": "wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "w_gate",
    "ffn_up": "w_up",
    "ffn_down": "w_down",
}


def llama_weights_from_gguf(reader, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """pallax weight names -> float32 arrays; linear weights as [out, in]."""
    weights: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        arr = dequantize(t)
        if t.name == "token_embd.weight":
            weights["embed"] = arr
        elif t.name == "output_norm.weight":
            weights["final_norm"] = arr
        elif t.name == "output.weight":
            weights["lm_head"] = arr
        elif parts[0] == "blk" and parts[2] in _LAYER_NAMES and parts[-1] == "weight":
            key = _LAYER_NAMES[parts[2]]
            if key == "wq":
                arr = _unpermute(arr, cfg.n_heads)
            elif key == "wk":
                arr = _unpermute(arr, cfg.n_kv_heads)
            weights[f"layers.{int(parts[1])}.{key}"] = arr
    _check_llama_weights(weights, cfg)
    return weights


def expected_llama_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
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


def _check_llama_weights(weights, cfg):
    expected = expected_llama_shapes(cfg)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"GGUF lacks tensors {missing[:5]} (of {len(missing)} missing)")
    for name, shape in expected.items():
        if weights[name].shape != shape:
            raise ValueError(f"tensor {name!r} has shape {weights[name].shape}, expected {shape}")
