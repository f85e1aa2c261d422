"""Causal prefill attention over a dense KV cache (FlashAttention-2 tiling): Pallas kernels
(Mosaic TPU, Triton GPU) and the reference."""

from pallax.pallas_kernels.flash_attention.kernel import BlockSizes, flash_attention, supports
from pallax.pallas_kernels.flash_attention.reference import flash_attention_reference

__all__ = ["BlockSizes", "flash_attention", "flash_attention_reference", "supports"]
