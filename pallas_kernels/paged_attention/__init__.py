"""Decode attention over a paged KV cache (a pool of pages and block tables): Pallas
kernels (Mosaic TPU, Triton on CUDA) and the reference."""

from pallax.pallas_kernels.paged_attention.kernel import paged_decode_attention, supports
from pallax.pallas_kernels.paged_attention.reference import paged_decode_attention_reference

__all__ = ["paged_decode_attention", "paged_decode_attention_reference", "supports"]
