"""RMSNorm as a Pallas kernel: Mosaic TPU (this file) and Mosaic GPU (``gpu.py``).

Leading dimensions are flattened to rows and the grid walks blocks of rows; each
block holds whole rows, so the reduction over ``D`` never crosses grid steps.
Statistics are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallax.pallas_kernels.platforms import resolve_platform
from pallax.pallas_kernels.rms_norm.gpu import rms_norm_gpu

_TPU_SUBLANES = 8  # second-minor tiling of a TPU block


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per grid step.

    On TPU ``block_rows`` must be a multiple of 8 unless it covers every row (a
    block equal to the full array is always legal); a partial last block is
    fine. On GPU it is the number of rows one CTA normalises, any positive value.
    """

    block_rows: int

    def __post_init__(self):
        if self.block_rows < 1:
            raise ValueError(f"{self.block_rows=} must be positive")

    @classmethod
    def get_default(cls, platform: str = "tpu") -> BlockSizes:
        # TPU: 64 rows of D=8192 in float32 is 2 MiB a buffer, so the double-buffered
        # input and output plus float32 temporaries stay inside the default scoped VMEM.
        # GPU: a few rows per CTA keeps many CTAs in flight for small (decode) batches.
        return cls(block_rows=64 if platform == "tpu" else 4)


def _rms_norm_kernel(
    x_ref,  # [block_rows, D]
    w_ref,  # [1, D]
    o_ref,  # [block_rows, D]
    *,
    eps: float,
):
    x = x_ref[...].astype(jnp.float32)  # [block_rows, D]
    mean_sq = jnp.mean(x * x, axis=-1, keepdims=True)  # [block_rows, 1]
    w = w_ref[...].astype(jnp.float32)  # [1, D]
    o_ref[...] = (x * lax.rsqrt(mean_sq + eps) * w).astype(o_ref.dtype)


def _rms_norm_tpu(x, w, *, eps, block_rows, interpret):
    num_rows, num_cols = x.shape
    block_rows = min(block_rows, num_rows)
    return pl.pallas_call(
        functools.partial(_rms_norm_kernel, eps=eps),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(pl.cdiv(num_rows, block_rows),),
        in_specs=[
            pl.BlockSpec((block_rows, num_cols), lambda i: (i, 0)),
            pl.BlockSpec((1, num_cols), lambda i: (0, 0)),
        ],
        out_specs=pl.BlockSpec((block_rows, num_cols), lambda i: (i, 0)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name="rms_norm",
    )(x, w.reshape(1, num_cols))


def rms_norm(
    x: jax.Array,
    w: jax.Array,
    *,
    eps: float,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """Fused RMSNorm over the last axis, same contract as ``rms_norm_reference``.

    Args:
      x: ``[..., D]`` activations.
      w: ``[D]`` scale.
      eps: added to the mean square.
      block_sizes: row tiling, ``BlockSizes.get_default(platform)`` if None.
      interpret: run the kernel in Pallas interpret mode (on CPU).
      platform: "tpu" (Mosaic TPU) or "cuda" (Mosaic GPU, sm90+); None picks the
        default backend's (on CPU with ``interpret``: the TPU kernel). Pass it
        explicitly when exporting for another platform.

    Returns:
      ``[..., D]`` in ``x.dtype``.
    """
    if x.ndim < 1 or w.shape != x.shape[-1:]:
        raise ValueError(f"w.shape={w.shape} must be (D,) for x.shape={x.shape}")
    if not (jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(w.dtype, jnp.floating)):
        raise ValueError(f"x.dtype={x.dtype} and w.dtype={w.dtype} must be floating")
    platform = resolve_platform(platform, interpret)
    block_sizes = block_sizes or BlockSizes.get_default(platform)
    if x.size == 0:
        return x
    num_cols = x.shape[-1]
    rows = x.reshape(-1, num_cols)  # [R, D]
    num_rows = rows.shape[0]
    if platform == "cuda":
        out = rms_norm_gpu(
            rows, w, eps=float(eps), block_rows=block_sizes.block_rows, interpret=interpret
        )
    else:
        block_rows = block_sizes.block_rows
        if block_rows < num_rows and block_rows % _TPU_SUBLANES:
            raise ValueError(
                f"{block_rows=} must be a multiple of {_TPU_SUBLANES} on TPU when it does not"
                f" cover all {num_rows=}"
            )
        out = _rms_norm_tpu(rows, w, eps=float(eps), block_rows=block_rows, interpret=interpret)
    return out.reshape(x.shape)
