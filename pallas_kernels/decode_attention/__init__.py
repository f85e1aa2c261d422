"""Decode attention over a dense KV cache: Pallas kernels (Mosaic TPU, Mosaic GPU) and reference."""

from pallax.pallas_kernels.decode_attention.kernel import BlockSizes, decode_attention
from pallax.pallas_kernels.decode_attention.reference import decode_attention_reference

__all__ = ["BlockSizes", "decode_attention", "decode_attention_reference"]
