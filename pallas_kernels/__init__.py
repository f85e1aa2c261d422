"""Fused Pallas kernels (one package per op) and their per-platform lowerings."""

from pallax.pallas_kernels import lowerings

__all__ = ["lowerings"]
