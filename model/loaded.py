"""A loaded model: config, float weights by name, tokenizer, and its forward."""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from pallax.model import architectures
from pallax.model.configs import KNOWN_MODELS, ModelConfig
from pallax.passes.ir import CacheLayout


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    config: ModelConfig
    weights: dict[str, jax.Array]
    tokenizer: Any
    source: str
    passes: tuple = ()  # passes already applied to `weights` (a model loaded from a checkpoint)

    @property
    def forward(self):
        return functools.partial(architectures.module_for(self.config).forward, self.config)

    def cache_layout(self, dtype=jnp.float32) -> CacheLayout:
        return CacheLayout.dense(
            architectures.module_for(self.config).cache_shapes(self.config), dtype
        )

    def __repr__(self) -> str:
        c = self.config
        n = sum(int(w.size) for w in self.weights.values())
        return (
            f"Model({c.name or c.arch!r}, arch={c.arch}, layers={c.n_layers}, dim={c.dim}, "
            f"params={n / 1e6:.1f}M, source={self.source!r})"
        )


def load(
    name_or_path: str | os.PathLike = "smollm2-135m", *, keep_quantized: bool = False
) -> Model:
    """Load a model by name (see `pallax.model.configs.KNOWN_MODELS`) or from a path:
    a .gguf file, a Hugging Face checkpoint directory (config.json + *.safetensors)
    or a pallax checkpoint written by `CompiledModel.save`.

    keep_quantized=True (GGUF only): the file's quantized tensors (Q8_0, Q4_0, Q4_1,
    Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) load straight into pallax's int8 / int4 group
    formats, without a float round trip, and run at those bits.
    """
    from pallax.model import sources

    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"model must be a model name or a path, got {name_or_path!r}")
    if not isinstance(keep_quantized, bool):
        raise ValueError(f"keep_quantized={keep_quantized!r} must be True or False")
    candidate = pathlib.Path(name_or_path).expanduser()
    if not candidate.exists() and candidate.parent.is_dir():
        from pallax import atomic_dir

        atomic_dir.recover(candidate)  # a save killed mid-replace: put the old checkpoint back
    path = pathlib.Path(sources.resolve(name_or_path))
    if path.is_dir() and keep_quantized:
        raise ValueError(
            f"keep_quantized=True applies to GGUF files; {str(path)!r} is a directory "
            "(quantize its weights with pallax.passes.quantize_weights instead)"
        )
    if path.is_dir():
        from pallax.model import checkpoint, hf_checkpoint

        if checkpoint.is_checkpoint(path):
            return checkpoint.load_checkpoint(path)
        if (path / "config.json").is_file():
            return hf_checkpoint.load_hf_directory(path)
        raise ValueError(
            f"directory {str(path)!r} has no config.json (a Hugging Face checkpoint) and no "
            f"{checkpoint.MANIFEST} (a pallax checkpoint); pallax loads those, .gguf files "
            f"and the known models {sorted(KNOWN_MODELS)}"
        )
    return load_gguf(path, keep_quantized=keep_quantized)


def load_gguf(path: pathlib.Path, *, keep_quantized: bool = False) -> Model:
    from pallax.model import gguf_loader
    from pallax.model.tokenizer import Tokenizer

    reader = gguf_loader.open_gguf(path)
    config = gguf_loader.config_from_gguf(reader)
    tokenizer = Tokenizer.from_gguf(reader)
    arrays = gguf_loader.weights_from_gguf(
        reader, config, origin=str(path), keep_quantized=keep_quantized
    )
    weights = {k: jax.device_put(v) for k, v in arrays.items()}
    return Model(config=config, weights=weights, tokenizer=tokenizer, source=str(path))
