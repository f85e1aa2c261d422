"""Architecture name -> the module that implements it.

Each module provides `forward(cfg, weights, cache, tokens, pos, logits_index)`,
`cache_shapes(cfg)`, `weight_shapes(cfg)` (pallax weight names -> shapes),
`logical_axes(cfg)` (weight names -> an axis name per dimension, for sharding) and
`CACHE_AXES` (the logical axes of the cache arrays' leading dimensions).
"""

from __future__ import annotations

from types import ModuleType

from pallax.model import gemma3, llama
from pallax.model.configs import SUPPORTED_ARCHITECTURES, ModelConfig

ARCHITECTURES: dict[str, ModuleType] = {"llama": llama, "gemma3": gemma3}
assert tuple(ARCHITECTURES) == SUPPORTED_ARCHITECTURES


def module_for(cfg: ModelConfig) -> ModuleType:
    return ARCHITECTURES[cfg.arch]


def check_weights(weights, cfg: ModelConfig, origin: str) -> None:
    """Every expected weight present with its shape; `origin` names the file in errors."""
    expected = module_for(cfg).weight_shapes(cfg)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(
            f"{origin}: missing tensors for {cfg.arch} (pallax names) {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} missing)"
        )
    for name, shape in expected.items():
        got = tuple(weights[name].shape)
        if got != tuple(shape):
            raise ValueError(
                f"{origin}: tensor {name!r} has shape {got}, but the config implies {tuple(shape)}"
            )
