"""A loaded model: config, float weights by name, tokenizer, and its forward."""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from pallax.ir.graph import CacheLayout
from pallax.model import architectures
from pallax.model.configs import ModelConfig


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
        # parameters of the float matrices (a packed QuantizedWeight stands for one)
        n = sum(math.prod(w.shape) for w in self.weights.values())
        return (
            f"Model({c.name or c.arch!r}, arch={c.arch}, layers={c.n_layers}, dim={c.dim}, "
            f"params={n / 1e6:.1f}M, source={self.source!r})"
        )


def load_gguf(path: pathlib.Path, *, keep_quantized: bool = False, lazy: bool = False) -> Model:
    from pallax.model import gguf_loader
    from pallax.model.tokenizer_gguf import tokenizer_from_gguf

    reader = gguf_loader.open_gguf(path)
    config = gguf_loader.config_from_gguf(reader)
    tokenizer = tokenizer_from_gguf(reader)
    arrays = gguf_loader.weights_from_gguf(
        reader, config, origin=str(path), keep_quantized=keep_quantized, lazy=lazy
    )
    weights = arrays if lazy else {k: jax.device_put(v) for k, v in arrays.items()}
    return Model(config=config, weights=weights, tokenizer=tokenizer, source=str(path))
