"""Pure-jnp quantized matmul, the numerical reference for the Pallas kernels (and the CPU path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallax.ir.qformat import unpack_int4


def qmatmul_reference(
    x: jax.Array,
    data: jax.Array,
    scale: jax.Array,
    offset: jax.Array | None,
    *,
    bits: int,
    group_size: int,
) -> jax.Array:
    """``x @ w.T`` for a weight ``w`` in pallax's packed format, dequantized then dotted in float32.

    Args:
      x: ``[R, Ip]`` float activations, zero-padded to whole groups.
      data: int8 ``[O, Ip]`` (bits=8) or uint8 ``[O, Ip // 2]`` nibbles (bits=4) in the
        group-halves layout of ``ir/qformat.py``.
      scale: float32 ``[O, G]``, one scale per output feature and group of ``group_size``.
      offset: float32 ``[O, G]`` or None: ``w = value * scale + offset``.
      bits: 4 or 8.
      group_size: input features per group (``Ip`` for one scale per output feature).

    Returns:
      ``[R, O]`` float32.
    """
    num_out, num_groups = scale.shape
    values = data if bits == 8 else unpack_int4(data, group_size)  # [O, Ip]
    w = values.astype(jnp.float32).reshape(num_out, num_groups, group_size)
    w = w * scale[..., None]
    if offset is not None:
        w = w + offset[..., None]
    w = w.reshape(num_out, num_groups * group_size)  # [O, Ip]
    return jnp.einsum(
        "RI,OI->RO",
        x.astype(jnp.float32),
        w,
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
