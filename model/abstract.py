"""Models with abstract weights: every weight a `jax.ShapeDtypeStruct`, from a config
alone (a name in `KNOWN_SHAPES`, an HF config.json, a GGUF file's header).

Such a model compiles, runs its passes (casts and round-to-nearest quantization change
shapes and dtypes only), shards onto meshes this machine does not have, reports its
memory and lowers for tpu / cuda, but cannot generate: there is nothing to multiply.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp

from pallax.model import architectures
from pallax.model.configs import ModelConfig
from pallax.model.loaded import Model


def is_abstract(tree) -> bool:
    """Whether any array of `tree` (weights, a QuantizedWeight) is abstract."""
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def abstract_model(config: ModelConfig, source: str, dtype=jnp.bfloat16) -> Model:
    """The model of `config` with abstract weights of `dtype` (the checkpoint's)."""
    shapes = architectures.module_for(config).weight_shapes(config)
    weights = {k: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)) for k, s in shapes.items()}
    return Model(config=config, weights=weights, tokenizer=None, source=source)


def abstract_from_path(path: pathlib.Path) -> Model:
    """A GGUF file (its header), an HF config.json or a directory holding one."""
    from pallax.model import hf_checkpoint

    path = pathlib.Path(path)
    if path.is_dir():
        path = path / hf_checkpoint.CONFIG_FILE
    if path.suffix == ".gguf":
        from pallax.model import gguf_loader

        config = gguf_loader.config_from_gguf(gguf_loader.open_gguf(path))
        return abstract_model(config, str(path), jnp.float32)
    if not path.is_file():
        raise FileNotFoundError(f"no {hf_checkpoint.CONFIG_FILE} at {str(path)!r}")
    raw = hf_checkpoint._read_json(path)
    config = hf_checkpoint.config_from_hf(raw, origin=str(path), name=path.parent.name)
    text = raw.get("text_config", raw)
    dtype = text.get("torch_dtype") or raw.get("torch_dtype") or "bfloat16"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{str(path)!r}: torch_dtype {dtype!r} is not float32/bfloat16/float16")
    return abstract_model(config, str(path), dtype)
