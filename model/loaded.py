"""A loaded model: config, float weights by name, tokenizer, and its forward."""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from pallax.model import llama
from pallax.model.configs import KNOWN_MODELS, ModelConfig
from pallax.passes.ir import CacheLayout


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    config: ModelConfig
    weights: dict[str, jax.Array]
    tokenizer: Any
    source: str

    @property
    def forward(self):
        return functools.partial(llama.forward, self.config)

    def cache_layout(self, dtype=jnp.float32) -> CacheLayout:
        return CacheLayout.dense(llama.cache_shapes(self.config), dtype)

    def __repr__(self) -> str:
        c = self.config
        n = sum(int(w.size) for w in self.weights.values())
        return (
            f"Model({c.name or c.arch!r}, arch={c.arch}, layers={c.n_layers}, dim={c.dim}, "
            f"params={n / 1e6:.1f}M, source={self.source!r})"
        )


def load(name_or_path: str | os.PathLike = "smollm2-135m") -> Model:
    """Load a model by name (see `pallax.model.configs.KNOWN_MODELS`) or from a .gguf path."""
    from pallax.model import gguf_loader, sources
    from pallax.model.tokenizer import Tokenizer

    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"model must be a model name or a path, got {name_or_path!r}")
    path = sources.resolve(name_or_path)
    if pathlib.Path(path).is_dir():
        raise ValueError(
            f"{str(path)!r} is a directory; pallax loads .gguf files (known names: "
            f"{sorted(KNOWN_MODELS)})"
        )
    reader = gguf_loader.open_gguf(path)
    config = gguf_loader.config_from_gguf(reader)
    tokenizer = Tokenizer.from_gguf(reader)
    arrays = gguf_loader.llama_weights_from_gguf(reader, config)
    weights = {k: jnp.asarray(v) for k, v in arrays.items()}
    return Model(config=config, weights=weights, tokenizer=tokenizer, source=str(path))
