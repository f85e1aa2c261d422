"""H2O decode attention with attention mass: Pallas kernels (Mosaic TPU, Triton GPU) and the
jnp reference."""

from pallax.pallas_kernels.h2o_attention.kernel import (
    MAX_S,
    BlockSizes,
    h2o_decode_attention,
    kernel_supports,
)
from pallax.pallas_kernels.h2o_attention.reference import h2o_decode_attention_reference

__all__ = [
    "MAX_S",
    "BlockSizes",
    "h2o_decode_attention",
    "h2o_decode_attention_reference",
    "kernel_supports",
]
