"""KIVI decode attention: Pallas kernels (Mosaic TPU, Triton GPU) and the jnp reference."""

from pallax.pallas_kernels.kivi_attention.kernel import (
    BlockSizes,
    kernel_supports,
    kivi_decode_attention,
)
from pallax.pallas_kernels.kivi_attention.reference import kivi_decode_attention_reference

__all__ = [
    "BlockSizes",
    "kernel_supports",
    "kivi_decode_attention",
    "kivi_decode_attention_reference",
]
