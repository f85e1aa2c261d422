"""Fused Pallas kernels (one package per op) and their per-platform lowerings."""
