"""Load a Hugging Face checkpoint directory: config.json, *.safetensors and the tokenizer files.

Reads Llama and Gemma 3 checkpoints as transformers' `save_pretrained` writes them (for a
multimodal Gemma 3, only its language model), without torch: the safetensors format is parsed
here with numpy. HF stores linear weights [out, in] in the rotate-half RoPE layout pallax uses,
so nothing is permuted; Gemma's RMSNorm multiplies by (1 + w), so 1 is added to its norm weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Any

import jax
import ml_dtypes
import numpy as np
import tokenizers

from pallax.model import architectures
from pallax.model.configs import ModelConfig
from pallax.model.loaded import Model
from pallax.text.tokenizer import Tokenizer, TokenizerConfig, end_of_turn_ids

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_MODEL_TYPES = ("llama", "gemma3_text", "gemma3")
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
# transformers' Gemma3TextConfig defaults: the text_config of Google's multimodal checkpoints
# writes only what differs from them.
_GEMMA3_DEFAULTS = {
    "vocab_size": 262_208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "sliding_window_pattern": 6, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
}  # fmt: skip
_REQUIRED = {
    "llama": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"),
    "gemma3": ("hidden_size", "intermediate_size", "num_hidden_layers"),
}  # fmt: skip
_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "global"}

_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "wq",
    "self_attn.k_proj": "wk",
    "self_attn.v_proj": "wv",
    "self_attn.o_proj": "wo",
    "self_attn.q_norm": "q_norm",
    "self_attn.k_norm": "k_norm",
    "mlp.gate_proj": "w_gate",
    "mlp.up_proj": "w_up",
    "mlp.down_proj": "w_down",
}
_ARCH_LAYER_NAMES = {
    "llama": {"post_attention_layernorm": "ffn_norm"},
    "gemma3": {
        "post_attention_layernorm": "post_attn_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffn_norm",
    },
}
# Where the language model's tensors live: a text-only checkpoint, or a multimodal Gemma 3 as
# transformers >= 4.52 saves it and as the original checkpoints (and transformers 4.50) do.
_TEXT_PREFIXES = {False: ("model.",), True: ("model.language_model.", "language_model.model.")}
_HEAD_NAMES = {
    False: ("lm_head.weight",),
    True: ("lm_head.weight", "language_model.lm_head.weight"),
}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")


def load_hf_directory(path: pathlib.Path, *, lazy: bool = False) -> Model:
    """The model saved in a Hugging Face checkpoint directory, with float32 weights
    (lazy: `ir.lazy.LazyWeight`s over the mapped files, read where placed)."""
    path = pathlib.Path(path)
    raw = _read_json(path / CONFIG_FILE)
    config = config_from_hf(raw, origin=str(path / CONFIG_FILE), name=path.name)
    tensors = _tensor_index(path)
    multimodal = raw.get("model_type") == "gemma3"
    names = _pallax_names(tensors, config, multimodal, origin=str(path))
    tokenizer = load_hf_tokenizer(path)
    weights = {}
    for key, name in names.items():
        gemma_norm = config.arch == "gemma3" and key.endswith("norm")
        if lazy:
            from pallax.ir import lazy as lazy_weights

            t = tensors[name]
            arr = lazy_weights.from_safetensors(t.file, _DTYPES[t.dtype], t.offset, t.shape, key)
            weights[key] = arr.map(lambda a: a + 1.0) if gemma_norm else arr
            continue
        arr = _read_tensor(tensors[name])
        if gemma_norm:
            arr += 1.0
        weights[key] = jax.device_put(arr)
    return Model(config=config, weights=weights, tokenizer=tokenizer, source=str(path))


def _read_json(file: pathlib.Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r} not found")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(file)!r} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(file)!r} holds a {type(value).__name__}, expected a JSON object")
    return value


def config_from_hf(raw: dict, origin: str = CONFIG_FILE, name: str = "") -> ModelConfig:
    """The ModelConfig of a transformers config.json (the same one the GGUF loader gives)."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{origin}: model_type {model_type!r} is not supported; "
            f"supported: {SUPPORTED_MODEL_TYPES}"
        )
    text = raw
    if model_type == "gemma3":
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ValueError(f"{origin}: a multimodal gemma3 config needs a text_config object")
    arch = "llama" if model_type == "llama" else "gemma3"
    defaults = _GEMMA3_DEFAULTS if arch == "gemma3" else {}
    missing = [k for k in _REQUIRED[arch] if k not in text]
    if missing:
        raise ValueError(f"{origin}: missing required keys {missing}")

    def get(key: str, default: Any = None) -> Any:
        return text.get(key, defaults.get(key, default))

    _check_supported(text, arch, origin)
    try:
        dim, n_layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
        n_heads = int(get("num_attention_heads"))
        if arch == "llama":
            extra = _llama_rope(text)
        else:
            extra = _gemma3_fields(text, get, n_layers, dim)
        return ModelConfig(
            arch=arch,
            vocab_size=int(get("vocab_size")),
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(get("num_key_value_heads") or n_heads),
            head_dim=int(get("head_dim") or dim // n_heads),
            ffn_dim=int(text["intermediate_size"]),
            context_length=int(get("max_position_embeddings", 2048)),
            norm_eps=float(get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", arch == "gemma3")),
            mlp_kind="swiglu" if arch == "llama" else "geglu_tanh",
            name=name,
            **extra,
        )
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"{origin}: {e}") from None


def _check_supported(text: dict, arch: str, origin: str) -> None:
    """Biases, another activation or bidirectional attention: pallax would compute another model."""
    act_key = "hidden_act" if arch == "llama" else "hidden_activation"
    act = "silu" if arch == "llama" else "gelu_pytorch_tanh"
    problems = [f"{k}=true" for k in ("attention_bias", "mlp_bias") if text.get(k)]
    if text.get(act_key, act) != act:
        problems.append(f"{act_key}={text[act_key]!r} (pallax has {act!r})")
    if text.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention=true (pallax is causal)")
    if problems:
        raise ValueError(f"{origin}: unsupported {arch} settings: {', '.join(problems)}")


def _rope(params: dict) -> tuple[float, float]:
    """(theta, linear scaling factor) of one transformers rope parameter set."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(f"rope_type {kind!r} is not supported; allowed: default, linear")
    scaling = float(params.get("factor", 1.0)) if kind == "linear" else 1.0
    return float(params["rope_theta"]), scaling


def _llama_rope(text: dict) -> dict:
    # transformers 5 writes rope_parameters; older versions rope_theta and rope_scaling.
    params = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta, scaling = _rope({"rope_theta": text.get("rope_theta", 10000.0), **params})
    return {"rope_theta": theta, "rope_scaling": scaling}


def _gemma3_fields(text: dict, get, n_layers: int, dim: int) -> dict:
    """Gemma 3's departures from Llama (see `gguf_loader._gemma3_extras` for the GGUF twin)."""
    if "layer_types" in text:
        bad = sorted(set(text["layer_types"]) - set(_LAYER_TYPES))
        if bad:
            raise ValueError(f"layer_types {bad} are not supported; allowed: {list(_LAYER_TYPES)}")
        layer_types = tuple(_LAYER_TYPES[t] for t in text["layer_types"])
    else:
        period = int(get("sliding_window_pattern"))
        layer_types = tuple("sliding" if (i + 1) % period else "global" for i in range(n_layers))
    # transformers 5: rope_parameters per layer type; older: rope_theta, rope_local_base_freq
    # and rope_scaling (of the global layers).
    params = text.get("rope_parameters") or {"full_attention": text.get("rope_scaling")}
    full = {"rope_theta": get("rope_theta"), **(params.get("full_attention") or {})}
    local = {"rope_theta": get("rope_local_base_freq"), **(params.get("sliding_attention") or {})}
    theta, scaling = _rope(full)
    local_theta, local_scaling = _rope(local)
    if local_scaling != 1.0:
        raise ValueError("RoPE scaling on sliding layers is not supported")
    attn_cap, final_cap = text.get("attn_logit_softcapping"), text.get("final_logit_softcapping")
    return dict(
        rope_theta=theta,
        rope_scaling=scaling,
        layer_types=layer_types,
        sliding_window=int(get("sliding_window")),
        rope_local_theta=local_theta,
        query_pre_attn_scalar=float(get("query_pre_attn_scalar")),
        embed_scale=float(dim) ** 0.5,
        qk_norm=True,
        attn_softcap=None if attn_cap is None else float(attn_cap),
        final_softcap=None if final_cap is None else float(final_cap),
    )


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """Where one tensor's data lies in a safetensors file."""

    file: pathlib.Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # of the first data byte, from the start of the file


def read_safetensors_header(file: pathlib.Path) -> dict[str, _Tensor]:
    """The tensors of one safetensors file (8-byte little-endian header length, JSON header,
    raw little-endian data), each checked to lie inside the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or 8 + n > size:
            raise ValueError(
                f"{str(file)!r} is truncated or not a safetensors file: header length "
                f"{n if len(prefix) == 8 else '?'} runs past the end of the file ({size} bytes)"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{str(file)!r}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{str(file)!r}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{str(file)!r}: bad header entry for {name!r}: {entry!r}") from None
        if dtype not in _DTYPES:
            raise ValueError(
                f"{str(file)!r}: tensor {name!r} has dtype {dtype}; supported: {list(_DTYPES)}"
            )
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if not 0 <= start <= end or end - start != nbytes:
            raise ValueError(
                f"{str(file)!r}: tensor {name!r} data_offsets [{start}, {end}] do not fit its "
                f"{dtype} shape {list(shape)} ({nbytes} bytes)"
            )
        if 8 + n + end > size:
            raise ValueError(
                f"{str(file)!r}: tensor {name!r} data_offsets end {end} runs past the end of the "
                f"file (truncated? {size - 8 - n} data bytes)"
            )
        tensors[name] = _Tensor(file, dtype, shape, 8 + n + start)
    return tensors


def _tensor_index(path: pathlib.Path) -> dict[str, _Tensor]:
    """Every tensor of the checkpoint: from model.safetensors or the shards index.json lists."""
    if (path / INDEX_FILE).is_file():
        index = path / INDEX_FILE
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{str(index)!r} has no weight_map object")
        headers = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise FileNotFoundError(f"{str(index)!r} refers to shard {shard!r}, not found")
            headers[shard] = read_safetensors_header(path / shard)
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise ValueError(f"{str(index)!r} puts {name!r} in {shard!r}, which lacks it")
        return {name: headers[shard][name] for name, shard in weight_map.items()}
    if (path / WEIGHTS_FILE).is_file():
        return read_safetensors_header(path / WEIGHTS_FILE)
    raise FileNotFoundError(
        f"{str(path)!r} has no {WEIGHTS_FILE} or {INDEX_FILE} (pallax reads safetensors "
        f"weights only); it holds {sorted(p.name for p in path.iterdir())}"
    )


def _pallax_name(name: str, arch: str, multimodal: bool) -> str | None:
    if name in _HEAD_NAMES[multimodal]:
        return "lm_head"
    prefix = next((p for p in _TEXT_PREFIXES[multimodal] if name.startswith(p)), None)
    if prefix is None:
        return None
    rest = name[len(prefix) :]
    if rest in ("embed_tokens.weight", "norm.weight"):
        return "embed" if rest == "embed_tokens.weight" else "final_norm"
    layer_names = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES[arch]}
    match = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", rest)
    if match and match[2] in layer_names:
        return f"layers.{int(match[1])}.{layer_names[match[2]]}"
    return None


def _pallax_names(
    tensors: dict[str, _Tensor], cfg: ModelConfig, multimodal: bool, origin: str
) -> dict[str, str]:
    """pallax name -> checkpoint name of every weight the model uses; errors for unknown
    tensors and shapes the config does not imply, before any data is read."""
    expected = architectures.module_for(cfg).weight_shapes(cfg)
    names, unknown = {}, []
    for name, t in tensors.items():
        if multimodal and name.removeprefix("model.").startswith(_VISION_PREFIXES):
            continue
        key = _pallax_name(name, cfg.arch, multimodal)
        if key == "lm_head" and cfg.tie_embeddings:
            continue  # tied: the head is the embedding table
        if key not in expected or key in names:
            unknown.append(name)
            continue
        if t.shape != tuple(expected[key]):
            raise ValueError(
                f"{str(t.file)!r}: tensor {name!r} has shape {t.shape}, but config.json "
                f"implies {tuple(expected[key])}"
            )
        names[key] = name
    if unknown:
        raise ValueError(
            f"{origin!r}: tensors pallax's {cfg.arch} does not use (biases or another "
            f"architecture?): {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}"
        )
    architectures.check_weights({k: tensors[n] for k, n in names.items()}, cfg, origin)
    return names


def _read_tensor(t: _Tensor) -> np.ndarray:
    """A float32 copy of the tensor's data."""
    if math.prod(t.shape) == 0:
        return np.zeros(t.shape, np.float32)
    data = np.memmap(t.file, dtype=_DTYPES[t.dtype], mode="r", offset=t.offset, shape=t.shape)
    return np.array(data, dtype=np.float32)


def load_hf_tokenizer(path: pathlib.Path) -> Tokenizer:
    """A pallax Tokenizer from tokenizer.json, with the special tokens, BOS policy and chat
    template of tokenizer_config.json, generation_config.json and chat_template.jinja."""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no tokenizer.json (tokenizer.save_pretrained writes it)"
        )
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises its own exception type
        raise ValueError(f"{str(file)!r} is not a tokenizers file: {e}") from None
    if not isinstance(backend.model, tokenizers.models.BPE):
        raise ValueError(
            f"{str(file)!r}: {type(backend.model).__name__} tokenizers are not supported; "
            "pallax supports BPE (byte-level, or with byte fallback)"
        )
    settings = {}
    for name in ("generation_config.json", "tokenizer_config.json"):
        if (path / name).is_file():
            settings.update(_read_json(path / name))

    def token_id(key: str) -> int | None:
        token = settings.get(f"{key}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token is None:
            value = settings.get(f"{key}_token_id")
            return value[0] if isinstance(value, list) else value
        token_id = backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{str(path)!r}: {key}_token {token!r} is not in tokenizer.json")
        return token_id

    template = settings.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    bos_id, eos_id = token_id("bos"), token_id("eos")
    # Whether BOS/EOS are added: tokenizer_config.json's flags, else what tokenizer.json does.
    probe = backend.encode("").ids
    eos_ids = settings.get("eos_token_id")
    stop = {eos_id, *(eos_ids if isinstance(eos_ids, list) else [eos_ids])}
    stop |= end_of_turn_ids(backend.token_to_id, template)
    config = TokenizerConfig(
        model="llama" if backend.model.byte_fallback else "gpt2",
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        bos_id=bos_id,
        eos_id=eos_id,
        unk_id=token_id("unk"),
        pad_id=token_id("pad"),
        add_bos=bool(settings.get("add_bos_token", bos_id is not None and probe[:1] == [bos_id])),
        add_eos=bool(settings.get("add_eos_token", eos_id is not None and probe[-1:] == [eos_id])),
        stop_ids=tuple(sorted(stop - {None})),
        chat_template=template,
    )
    return Tokenizer(backend, config)
