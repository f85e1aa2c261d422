"""H2O decode attention with attention mass: Mosaic TPU (this file) and Triton GPU (``gpu.py``).

H2O (``ir/kvcache/h2o.py``) attends each decode query over ``S = M + 1`` candidates, the
``M`` cache slots and the new token, and evicts by the attention mass each candidate
received. Both come from one kernel: ``out`` [B, N, H] and ``mass`` [B, K, S], the
softmax probabilities summed over the ``N / K`` query heads of each kv head.

H2O budgets are hundreds of slots, so a (sequence, kv head)'s whole candidate axis is
one block: the softmax is exact (max, exponentials, one division), with no online
rescaling, and the mass is the same probabilities the output uses. ``S`` is covered up
to ``BlockSizes.max_s`` (default ``MAX_S = 2048``); above it, and for the dtypes and
head dims a kernel does not take (``kernel_supports``), the wrapper computes the
reference math instead.

TPU grid: (sequence, kv head), both parallel; ``qpos`` is scalar-prefetched. Blocks are
whole arrays along ``S`` and ``H`` (``[G, H]`` queries, ``[S, H]`` keys and values,
``[1, S]`` mass), so ``S`` needs no alignment. Visibility is data-dependent (slot
positions), and it masks along lanes for the logits but along sublanes for the values
(a NaN in an unseen value row would poison ``probs @ v`` as 0 * NaN): the positions,
padded to whole lanes with -1, are broadcast to 128 sublanes and transposed (an aligned
32-bit transpose) to get the per-row mask. At ``S = 2048``, ``H = 256`` and float32 the
working set is about 11 MiB (double-buffered keys and values 8 MiB, the float32 values
2 MiB, the row mask 1 MiB), inside the 16 MiB default scoped VMEM.

Dtypes: ``q``, keys and values float32 or bfloat16 (both platforms); dots accumulate in
float32, ``q @ k.T`` in the operands' dtype when they share one (a bfloat16 product is
exact in float32) and ``probs @ v`` in float32 at HIGHEST precision, so both match the
reference's float32 math up to the order of the sums.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallax.pallas_kernels.h2o_attention import gpu
from pallax.pallas_kernels.h2o_attention.reference import h2o_decode_attention_reference
from pallax.pallas_kernels.h2o_attention.shared import dot_dtype, precision, visible
from pallax.pallas_kernels.platforms import resolve_platform

MAX_S = 2048  # candidates one block holds (TPU VMEM; GPU: one program per kv head, no splits)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
TPU_MAX_HEAD_DIM = 256  # keeps the whole-S blocks inside the VMEM estimate above
_TPU_LANES = 128
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # [G, H] x [S, H] -> [G, S]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Candidate-axis tiling.

    max_s: the most candidates ``S`` the kernel takes; it holds a (sequence, kv head)'s
      whole ``S`` in one block (TPU) or one program (GPU). Larger ``S`` uses the reference.
    block_s: GPU only, candidates per step of the program's two passes over ``S``: a
      power of two, at least 16 (Triton tiles).
    """

    max_s: int = MAX_S
    block_s: int = 64

    def __post_init__(self):
        if self.max_s < 1:
            raise ValueError(f"{self.max_s=} must be positive")
        if self.block_s < 1:
            raise ValueError(f"{self.block_s=} must be positive")

    @classmethod
    def get_default(cls, platform: str = "tpu", *, head_dim: int = 128) -> BlockSizes:
        if platform == "tpu":
            return cls()
        # GPU: the [block_s, H] key and value tiles live in registers.
        return cls(block_s=64 if head_dim <= 128 else 32)


# ------------------------------------------------------------------------------ TPU
def _h2o_attention_kernel(
    qpos_ref,  # [B] int32, scalar-prefetched into SMEM
    q_ref,  # [G, H]
    k_ref,  # [S, H]
    v_ref,  # [S, H]
    kpos_ref,  # [1, S_pad] int32, -1: empty (and the lane padding past S)
    o_ref,  # [G, H] in q's dtype
    mass_ref,  # [1, S] float32
    *,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
):
    seq_len = k_ref.shape[0]
    qpos = qpos_ref[pl.program_id(0)]
    kpos = kpos_ref[...]  # [1, S_pad]
    q = q_ref[...]
    dtype = dot_dtype(q.dtype, k_ref.dtype)
    logits = lax.dot_general(
        q.astype(dtype), k_ref[...].astype(dtype), _CONTRACT_LAST, precision=precision(dtype),
        preferred_element_type=jnp.float32,
    ) * scale  # fmt: skip  # [G, S]
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(visible(kpos[:, :seq_len], qpos, sliding_window), logits, -jnp.inf)
    row_max = jnp.max(logits, axis=1, keepdims=True)  # [G, 1]
    row_max = jnp.where(row_max == -jnp.inf, 0.0, row_max)  # no visible key: probs stay 0
    probs = jnp.exp(logits - row_max)
    denom = jnp.sum(probs, axis=1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)  # [G, S]
    mass_ref[...] = jnp.sum(probs, axis=0, keepdims=True)

    # The value rows' mask: positions from lanes to sublanes by an aligned transpose.
    kpos_rows = jnp.transpose(jnp.broadcast_to(kpos, (_TPU_LANES, kpos.shape[1])))  # [S_pad, 128]
    seen_rows = visible(kpos_rows[:seq_len, :1], qpos, sliding_window)  # [S, 1]
    v = v_ref[...].astype(jnp.float32)
    v = jnp.where(seen_rows, v, jnp.zeros_like(v))  # unseen rows may hold NaN
    out = jnp.dot(probs, v, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    o_ref[...] = out.astype(o_ref.dtype)


def _h2o_attention_tpu(q, keys, vals, kpos, qpos, *, interpret, **static):
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, seq_len, _ = keys.shape
    group = num_heads // num_kv_heads
    padded = pl.cdiv(seq_len, _TPU_LANES) * _TPU_LANES
    q = q.reshape(batch, num_kv_heads, group, head_dim)  # [B, K, G, H]
    kpos = jnp.pad(kpos, ((0, 0), (0, 0), (0, padded - seq_len)), constant_values=-1)
    kpos = kpos[:, :, None, :]  # [B, K, 1, S_pad]

    def spec(rows, cols):
        return pl.BlockSpec((None, None, rows, cols), lambda b, h, qpos_ref: (b, h, 0, 0))

    out, mass = pl.pallas_call(
        functools.partial(_h2o_attention_kernel, **static),
        out_shape=(
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_kv_heads, 1, seq_len), jnp.float32),
        ),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, num_kv_heads),
            in_specs=[
                spec(group, head_dim),
                spec(seq_len, head_dim),
                spec(seq_len, head_dim),
                spec(1, padded),
            ],
            out_specs=[spec(group, head_dim), spec(1, seq_len)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="h2o_decode_attention",
    )(qpos, q, keys, vals, kpos)
    return out.reshape(batch, num_heads, head_dim), mass[:, :, 0]


# ------------------------------------------------------------------------ the wrapper
def _check_inputs(q, keys, vals, kpos, qpos, sliding_window, softcap):
    if q.ndim != 3 or keys.ndim != 4:
        raise ValueError(
            f"q.shape={q.shape} must be [B, N, H], keys.shape={keys.shape} [B, K, S, H]"
        )
    batch, num_heads, head_dim = q.shape
    if vals.shape != keys.shape:
        raise ValueError(f"vals.shape={vals.shape} must equal keys.shape={keys.shape}")
    k_batch, num_kv_heads, seq_len, k_head_dim = keys.shape
    if (k_batch, k_head_dim) != (batch, head_dim) or seq_len == 0:
        raise ValueError(f"keys.shape={keys.shape} does not match q.shape={q.shape} on B, H")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} must be divisible by {num_kv_heads=}")
    if kpos.shape != keys.shape[:3] or kpos.dtype != jnp.int32:
        raise ValueError(f"kpos ({kpos.shape}, {kpos.dtype}) must be int32 {keys.shape[:3]}")
    if qpos.shape != (batch,) or qpos.dtype != jnp.int32:
        raise ValueError(f"qpos ({qpos.shape}, {qpos.dtype}) must be int32 [{batch}]")
    if keys.dtype != vals.dtype:
        raise ValueError(f"dtypes differ: {keys.dtype=} {vals.dtype=}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{sliding_window=} must be positive or None")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"{softcap=} must be positive or None")


def kernel_supports(platform: str, q_dtype, keys, block_sizes: BlockSizes) -> bool:
    """Whether ``platform``'s kernel covers this case (else the wrapper uses the reference).

    Both: ``q`` and the candidates float32 or bfloat16, ``S <= block_sizes.max_s``. TPU:
    ``H <= 256`` (the VMEM estimate). GPU: ``H`` a power of two from 16 to 256.
    """
    if not {jnp.dtype(q_dtype), jnp.dtype(keys.dtype)} <= set(SUPPORTED_DTYPES):
        return False
    _, _, seq_len, head_dim = keys.shape
    if seq_len > block_sizes.max_s:
        return False
    if platform == "cuda":
        return gpu.supports(head_dim)
    return head_dim <= TPU_MAX_HEAD_DIM


def h2o_decode_attention(
    q: jax.Array,
    keys: jax.Array,
    vals: jax.Array,
    kpos: jax.Array,
    qpos: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    platform: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Single-query grouped-query attention over H2O's candidates, with the mass each got.

    Same contract as ``h2o_decode_attention_reference``: ``q`` [B, N, H], ``keys`` and
    ``vals`` [B, K, S, H], ``kpos`` [B, K, S] int32 (-1: empty), ``qpos`` [B] int32.
    Candidates the query does not see (empty, after it, before its window) never reach
    the output or the mass, even when they hold NaN.

    Args:
      block_sizes: ``BlockSizes.get_default(platform, head_dim=H)`` if None.
      interpret: run the kernel in Pallas interpret mode (on CPU).
      platform: "tpu" (Mosaic TPU) or "cuda" (Triton); None picks the default backend's
        (on CPU with ``interpret``: the TPU kernel). Pass it explicitly when exporting
        for another platform.

    Returns:
      ``out`` ``[B, N, H]`` in ``q.dtype`` and ``mass`` ``[B, K, S]`` float32.
    """
    _check_inputs(q, keys, vals, kpos, qpos, sliding_window, softcap)
    platform = resolve_platform(platform, interpret)
    block_sizes = block_sizes or BlockSizes.get_default(platform, head_dim=q.shape[-1])
    static = dict(
        scale=float(scale),
        sliding_window=None if sliding_window is None else int(sliding_window),
        softcap=None if softcap is None else float(softcap),
    )
    if platform == "cuda":
        gpu.check_block(block_sizes.block_s)
    if not kernel_supports(platform, q.dtype, keys, block_sizes):
        return h2o_decode_attention_reference(q, keys, vals, kpos, qpos, **static)
    if platform == "cuda":
        return gpu.h2o_decode_attention_gpu(
            q, keys, vals, kpos, qpos, block_s=block_sizes.block_s, interpret=interpret, **static
        )
    return _h2o_attention_tpu(q, keys, vals, kpos, qpos, interpret=interpret, **static)
