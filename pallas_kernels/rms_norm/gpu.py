"""RMSNorm on Mosaic GPU (Hopper and newer).

Each CTA (one warpgroup) normalises ``block_rows`` consecutive rows, loading a
whole row from GMEM into registers, so there is no shared-memory staging and no
TMA box limit on ``D``. The strided register layout needs a multiple of 128
elements per row: other ``D`` are zero-padded here (zeros do not change the sum
of squares, and the mean divides by the true ``D``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_ROW_ALIGN = 128  # elements per row the strided (one element per thread) layout needs


def _rms_norm_gpu_kernel(
    x_gmem,  # [R, Dp]
    w_gmem,  # [Dp]
    o_gmem,  # [R, Dp]
    *,
    eps: float,
    num_cols: int,
    block_rows: int,
):
    num_rows = x_gmem.shape[0]
    first_row = lax.axis_index("rows") * block_rows
    w = w_gmem[...].astype(jnp.float32)  # [Dp]

    @pl.loop(0, block_rows)
    def _row(r):
        row = first_row + r

        @pl.when(row < num_rows)
        def _normalize():
            x = x_gmem[row].astype(jnp.float32)  # [Dp]
            mean_sq = jnp.sum(x * x) / num_cols
            o_gmem[row] = (x * lax.rsqrt(mean_sq + eps) * w).astype(o_gmem.dtype)


def rms_norm_gpu(
    x: jax.Array, w: jax.Array, *, eps: float, block_rows: int, interpret: bool = False
) -> jax.Array:
    """RMSNorm of ``x`` [R, D] by ``w`` [D] as one Mosaic GPU kernel named ``rms_norm``."""
    num_rows, num_cols = x.shape
    padded_cols = pl.cdiv(num_cols, _ROW_ALIGN) * _ROW_ALIGN
    if padded_cols != num_cols:
        x = jnp.pad(x, ((0, 0), (0, padded_cols - num_cols)))
        w = jnp.pad(w, (0, padded_cols - num_cols))
    out = plgpu.kernel(
        functools.partial(_rms_norm_gpu_kernel, eps=eps, num_cols=num_cols, block_rows=block_rows),
        out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(pl.cdiv(num_rows, block_rows),),
        grid_names=("rows",),
        kernel_name="rms_norm",
        interpret=_gpu_interpret_params() if interpret else None,
    )(x, w)
    return out[:, :num_cols]


def _gpu_interpret_params():
    # GPU interpret mode (simulated GMEM/SMEM, threads, barriers) is only reachable through
    # jax's private module in jax 0.10; a plain `interpret=True` cannot bind the grid axes.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()
