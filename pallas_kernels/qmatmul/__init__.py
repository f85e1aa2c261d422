"""Quantized matmul (int8 or int4 weights, group scales): Pallas kernels and reference."""

from pallax.pallas_kernels.qmatmul.kernel import BlockSizes, qmatmul
from pallax.pallas_kernels.qmatmul.reference import qmatmul_reference

__all__ = ["BlockSizes", "qmatmul", "qmatmul_reference"]
