"""RMSNorm: Pallas kernel (Mosaic TPU, Mosaic GPU) and its pure-jnp reference."""

from pallax.pallas_kernels.rms_norm.kernel import BlockSizes, rms_norm
from pallax.pallas_kernels.rms_norm.reference import rms_norm_reference

__all__ = ["BlockSizes", "rms_norm", "rms_norm_reference"]
