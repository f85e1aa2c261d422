"""GPTQ (Frantar et al. 2022): quantize one weight matrix against its input Hessian.

GPTQ minimizes the layer's output error on calibration inputs X [N, I],

    || X W^T - X Q^T ||^2  =  trace((W - Q) H (W - Q)^T),    H = X^T X,

by quantizing W [O, I] one input column at a time and moving each column's rounding
error onto the columns not yet quantized (the optimal brain surgeon update).
Updates are applied lazily: column by column within a block of `block_size`
columns, and to the remaining columns with one matrix product per block.

The result is a `qformat.QuantizedWeight` in exactly the format `quantize_rtn`
produces, so everything that consumes RTN weights consumes GPTQ weights.

Design choices:

- One Cholesky, no inverse. The reference code factors H, inverts it and factors
  H^-1 again to get U = chol(H^-1)^T. With H = R R^T (R upper), U = R^-1, and the
  same quantized values follow from R alone: column k is rounded at
  w_k + sum_{j<k} (w_j - q_j) R[j, k] / R[k, k] (GPTQ as Babai's nearest plane
  algorithm, Chen et al. 2025). With static groups the values equal the textbook
  algorithm's exactly (tested against one written out in the test).
- Contiguous groups under act order. Act order (quantize the columns with the
  largest diag(H) first) is the biggest win on inputs with outlier features, but
  pallax's format needs each group to be g contiguous input features in the original
  order. Each group's grid (scale/offset) is therefore fixed the first time one of
  its columns comes up ("first touch"), from all its columns' weights plus the
  error feedback of the columns quantized so far (the partial sums above); the
  group's other columns are rounded on that grid when their turn comes. Without act
  order the first touch is the group's first column, the reference rule. (The
  reference reads OBS-updated weights there, which differ from the partial sums
  until the last term; measured on the test problems, the error moves by up to 3%,
  in either direction.)
  `static_groups=True` fixes every grid up front from the original weights, as the
  reference's static groups do. On the outlier problem of tests/passes/test_gptq.py
  first touch measured lower error at g32 (0.257 vs 0.276 of RTN's error; better on
  8 of 8 seeds) and the same at g128 (mean of 6 seeds 0.259 vs 0.258), so it is the
  default, with act order.
- Precision: the Hessian, its Cholesky factor and the weight updates are float64
  (numpy/LAPACK on the host), so the factorization of nearly singular Hessians of
  real activations stays stable. Scales and offsets are float32, as in the packed
  format, and rounding is done against them.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from pallax.ir import qformat
from pallax.ir.qformat import QuantizedWeight


def hessian_update(
    h: np.ndarray | None, x, count: int = 0, *, products=np.float64
) -> tuple[np.ndarray, int]:
    """Add one calibration batch x [..., I] to the running sum h = X^T X (float64).

    Returns (h, count) with count the number of input rows seen so far. GPTQ only
    needs H up to a positive factor (dampening is relative), so the sum works as is;
    h / count is the mean if a scale-free quantity is wanted. `products=np.float32`
    multiplies blocks of 2,048 rows in float32 (about 3x faster) and sums the blocks
    in float64: GPTQ dampens H by at least 1% of its mean diagonal, far above
    float32's rounding.
    """
    x = np.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"hessian_update: x must have an input-feature axis, got {x.shape=}")
    x = x.reshape(-1, x.shape[-1])
    if h is None:
        h = np.zeros((x.shape[1], x.shape[1]), np.float64)
    elif h.shape != (x.shape[1], x.shape[1]):
        raise ValueError(f"hessian_update: {h.shape=} does not match x's {x.shape[1]} features")
    for r in range(0, x.shape[0], 2048):
        b = x[r : r + 2048].astype(products)
        h += b.T @ b
    return h, count + x.shape[0]


def layer_error(w, q: QuantizedWeight, hessian) -> float:
    """trace((W - Q) H (W - Q)^T): the calibration output error GPTQ minimizes."""
    d = np.asarray(w, np.float64) - np.asarray(qformat.dequantize(q), np.float64)
    return float(np.sum((d @ np.asarray(hessian, np.float64)) * d))


def gptq_quantize(
    w,
    hessian,
    *,
    bits: int = 4,
    group_size: int | None = 128,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    static_groups: bool = False,
) -> QuantizedWeight:
    """Quantize w [O, I] with GPTQ against hessian [I, I] (X^T X of its inputs, any scale).

    bits=4: asymmetric int4 per group of `group_size` input features (None: one group
    of all features). bits=8: symmetric int8 -127..127 per group, or per output
    channel with group_size=None. `damp` adds damp * mean(diag(H)) to diag(H).
    Input features with H_ii = 0 (never active) get w = 0.
    """
    w = np.asarray(jnp.asarray(w, jnp.float32))
    h = np.asarray(hessian, np.float64)
    g = _check_args(w, h, bits, group_size, damp, block_size)
    vals, scale, offset = _gptq_batch(w, h, [damp], bits, g, block_size, act_order,
                                      static_groups)  # fmt: skip
    return _assemble(vals[0], scale[0], offset[0], bits, g, w.shape[1])


DAMPS = (0.01, 0.03, 0.1, 0.3, 1.0)


@dataclasses.dataclass(frozen=True)
class Choice:
    """What `gptq_select` chose for one weight: `damp` (None: round to nearest won) and
    the held-out output error of every candidate ("rtn" and each damp)."""

    damp: float | None
    errors: dict


def gptq_select(
    w,
    fit,
    held,
    *,
    bits: int = 4,
    group_size: int | None = 128,
    damps=None,
    block_size: int = 128,
    act_order: bool = True,
    static_groups: bool = False,
    memo: dict | None = None,
) -> tuple[QuantizedWeight, Choice]:
    """GPTQ with its dampening chosen on held-out activations, or round to nearest.

    `fit` and `held` are Hessians [I, I] of two disjoint parts of the calibration
    activations. w is quantized against `fit` once per damp in `damps` (one pass of
    the column loop for all of them), and each result's output error on the held-out
    part (`layer_error(w, q, held)`) is compared with round to nearest's. The
    winner's damp then quantizes w against fit + held (all the data); when round to
    nearest wins, its weight is returned: GPTQ never does worse than RTN on the
    held-out activations of any layer.

    Why: with little calibration text or a small damp, GPTQ fits the calibration's
    own activations (its error moves into directions the calibration rarely
    excites); how much dampening a layer needs depends on the layer and the data,
    so it is measured rather than fixed.

    `memo`: a dict kept by the caller for as long as `fit` and `held` live, shared by
    the weights that take the same input (q/k/v, gate/up): their Hessian factors
    are computed once.
    """
    w = np.asarray(jnp.asarray(w, jnp.float32))
    fit = np.asarray(fit, np.float64)
    held = np.asarray(held, np.float64)
    damps = tuple(float(d) for d in (DAMPS if damps is None else damps))
    if not damps:
        raise ValueError("gptq_select: damps is empty")
    g = _check_args(w, fit, bits, group_size, min(damps), block_size)  # the least damp: a bad one
    if held.shape != fit.shape or not np.all(np.isfinite(held)):
        raise ValueError(f"gptq_select: held {held.shape} must be finite and {fit.shape}")
    memo = {} if memo is None else memo
    vals, scale, offset = _gptq_batch(w, fit, damps, bits, g, block_size,
                                      act_order, static_groups, memo)  # fmt: skip
    rtn = qformat.quantize_rtn(w, bits, group_size)
    deq = np.concatenate([np.asarray(qformat.dequantize(rtn), np.float64)[None],
                          _dequantize(vals, scale, offset, g)])  # fmt: skip
    errors = dict(zip(("rtn", *damps), _errors(w, deq, held), strict=True))
    best = min(errors, key=errors.get)
    if best == "rtn":
        return rtn, Choice(None, errors)
    both = memo.setdefault(("sum", id(fit), id(held)), (fit + held, fit, held))[0]
    vals, scale, offset = _gptq_batch(w, both, [best], bits, g, block_size, act_order,
                                      static_groups, memo)  # fmt: skip
    return _assemble(vals[0], scale[0], offset[0], bits, g, w.shape[1]), Choice(best, errors)


def _errors(w, deq, hessian) -> list[float]:
    """layer_error of each candidate deq [K, O, I] (float32 products: errors are compared
    with each other, and differ by far more than float32's rounding)."""
    d = (np.asarray(w, np.float64)[None] - deq).astype(np.float32)
    hd = d @ hessian.astype(np.float32)
    return [float(v) for v in np.einsum("koi,koi->k", hd, d, dtype=np.float64)]


def _dequantize(vals, scale, offset, g) -> np.ndarray:
    """Integer values [..., O, I] on per-group grids [..., O, G] -> float64 [..., O, I]."""
    cols = np.arange(vals.shape[-1]) // g
    return vals * scale[..., cols].astype(np.float64) + np.asarray(offset)[..., cols]


def _gptq_batch(w, hess, damps, bits, g, block_size, act_order, static_groups, memo=None):
    """GPTQ of one w [O, I] against one Hessian with K dampenings at once.

    The K problems are stacked on a leading axis, so the column loop (whose Python
    overhead is most of GPTQ's time at these sizes) runs once for all of them.
    `memo` (a dict the caller keeps while the Hessians live) reuses factors across
    weights that share a Hessian (q/k/v, gate/up). Returns integer values [K, O, I]
    and grids scale, offset [K, O, G] in the original column order.
    """
    o, i = w.shape
    k = len(damps)
    grid = _Int4Grid() if bits == 4 else _Int8Grid()
    groups = math.ceil(i / g)
    memo = {} if memo is None else memo
    perm, dead = _prepared(hess, act_order, memo)[:2]
    wk = np.repeat(w[None].astype(np.float64), k, axis=0)
    wk[:, :, dead] = 0.0
    factors = np.empty((k, i, i))
    for c, damp in enumerate(damps):
        factors[c] = _factor(hess, damp, act_order, memo)
    scale = np.zeros((k, groups, o), np.float32)
    offset = np.zeros((k, groups, o), np.float32)
    ready = np.zeros(groups, bool)
    if static_groups:
        for j in range(groups):
            cols = wk[:, :, j * g : (j + 1) * g].transpose(2, 0, 1)
            scale[:, j], offset[:, j] = grid.params(cols)
        ready[:] = True
    wt = np.ascontiguousarray(wk[:, :, perm].transpose(0, 2, 1))  # [K, I, O] in processing order
    vals = _quantize_columns(wt, factors, grid, perm, g, block_size, scale, offset, ready)
    vals = vals[:, np.argsort(perm)].transpose(0, 2, 1)  # [K, O, I] in the original order
    return vals, scale.transpose(0, 2, 1), offset.transpose(0, 2, 1)


def _prepared(hess, act_order, memo):
    """(act order, dead features, H with dead diagonals set to 1 in processing order
    reversed (see _hessian_factor), its mean diagonal), memoized per Hessian."""
    key = ("prepared", id(hess), act_order)
    if key not in memo:
        h = np.array(hess, np.float64)
        dead = np.diag(h) == 0
        h[dead, dead] = 1.0
        perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(len(h))
        rev = perm[::-1]
        memo[key] = (perm, dead, h[np.ix_(rev, rev)], float(np.mean(np.diag(h))), hess)
    return memo[key][:4]  # (memo[key][4] keeps hess alive, so its id stays its own)


def _factor(hess, damp, act_order, memo):
    """S of the dampened H (see _hessian_factor), memoized per Hessian and damp."""
    key = ("factor", id(hess), damp, act_order)
    if key not in memo:
        h, mean = _prepared(hess, act_order, memo)[2:]
        hd = h.copy()
        hd[np.diag_indices(len(hd))] += damp * mean
        memo[key] = _hessian_factor(hd, damp)
    return memo[key]


def _check_args(w, h, bits, group_size, damp, block_size) -> int:
    """Validate the arguments; return the group size (g = I when group_size is None)."""
    if w.ndim != 2:
        raise ValueError(f"gptq_quantize: w must be [O, I], got {w.shape=}")
    i = w.shape[1]
    if h.shape != (i, i):
        raise ValueError(f"gptq_quantize: {h.shape=} must be [I, I] for {w.shape=}")
    if not np.all(np.isfinite(h)) or not np.all(np.isfinite(w)):
        raise ValueError("gptq_quantize: w and hessian must be finite")
    if bits not in qformat.SUPPORTED_BITS:
        raise ValueError(f"gptq_quantize: {bits=} not supported; allowed {qformat.SUPPORTED_BITS}")
    if group_size is not None and (group_size <= 0 or (bits == 4 and group_size % 2)):
        raise ValueError(f"gptq_quantize: {group_size=} must be positive (even for int4) or None")
    if damp < 0:
        raise ValueError(f"gptq_quantize: {damp=} must be >= 0")
    if block_size <= 0:
        raise ValueError(f"gptq_quantize: {block_size=} must be positive")
    if group_size is not None:
        return group_size
    return i + (i % 2) if bits == 4 else i


def _hessian_factor(h_reversed: np.ndarray, damp: float) -> np.ndarray:
    """S = R / diag(R), unit upper triangular, where H = R R^T (processing order).

    GPTQ's error feedback through the rows of chol(H^-1)^T = R^-1 (H = R R^T, R upper)
    is the same as adding the earlier columns' rounding errors d = w - q through
    S: column k is quantized at w_k + sum_{j<k} d_j S[j, k] (GPTQ as
    Babai's nearest plane, Chen et al. 2025). So one Cholesky of H suffices: no
    inverse, no second factorization. R comes from the lower Cholesky of the
    order-reversed H (`h_reversed`), flipped back.
    """
    try:
        low = np.linalg.cholesky(h_reversed)
    except np.linalg.LinAlgError as e:
        raise ValueError(
            f"gptq_quantize: the dampened Hessian is not positive definite ({damp=}); "
            "raise damp or feed more calibration data"
        ) from e
    r = low[::-1, ::-1]
    return np.ascontiguousarray(r / np.diag(r)[None, :])


def _quantize_columns(wt, s, grid, perm, g, block_size, scale, offset, ready) -> np.ndarray:
    """The GPTQ loop over wt [K, I, O] (K problems; rows in processing order; updated
    in place) with factors s [K, I, I] and grids scale, offset [K, G, O].

    Rows before the current block are done; rows at or after it hold the weights plus
    the error feedback of all earlier blocks. Within a block, a row's
    current value adds the feedback of the block's rows already quantized. A group's
    grid is set when its first row comes up, from all its rows' current values.
    Returns the integer values [K, I, O] in processing order.
    """
    k_, i, o = wt.shape
    w0 = wt.copy()
    vals = np.zeros(wt.shape, np.int16)
    group_of = perm // g
    position = np.argsort(perm)  # position[c] = processing index of original column c
    for b0 in range(0, i, block_size):
        b1 = min(b0 + block_size, i)
        d = np.zeros((k_, b1 - b0, o))  # w - q (original weights) of this block's rows
        for k in range(b0, b1):
            n = k - b0
            j = group_of[k]
            if not ready[j]:
                rows = position[j * g : (j + 1) * g]  # all >= k: none quantized yet
                cur = wt[:, rows] + np.matmul(s[:, b0:k, rows].transpose(0, 2, 1), d[:, :n])
                scale[:, j], offset[:, j] = grid.params(cur.transpose(1, 0, 2))
                ready[j] = True
            col = wt[:, k] + np.matmul(s[:, None, b0:k, k], d[:, :n])[:, 0]
            vals[:, k], deq = grid.round(col, scale[:, j], offset[:, j])
            d[:, n] = w0[:, k] - deq
        wt[:, b1:] += np.matmul(s[:, b0:b1, b1:].transpose(0, 2, 1), d)
    return vals


class _Int4Grid:
    """Asymmetric 0..15 on the grid of qformat.int4_fit (int4_params with a range search)."""

    def params(self, cols):  # cols [n, ...] -> scale [...], offset [...]
        return qformat.int4_fit(cols, axis=0)

    def round(self, col, scale, offset):
        v = np.clip(np.rint((col - offset) / scale), 0, 15)
        return v, v * scale + offset


class _Int8Grid:
    """Symmetric -127..127, no offset (quantize_rtn's bits=8)."""

    def params(self, cols):
        scale = np.abs(cols).max(axis=0) / 127.0
        return np.where(scale > 0, scale, 1.0).astype(np.float32), 0.0

    def round(self, col, scale, offset):
        v = np.clip(np.rint(col / scale), -127, 127)
        return v, v * scale


def _assemble(vals, scale, offset, bits, g, i) -> QuantizedWeight:
    """Integer values [O, I] and grids [O, G] -> the packed QuantizedWeight."""
    vals = qformat.pad_columns(vals, g)  # padding columns hold value 0
    if bits == 8:
        data = jnp.asarray(vals.astype(np.int8))
        return QuantizedWeight(data, jnp.asarray(scale), None, None, None, 8, g, i)
    data = jnp.asarray(qformat.pack_int4(vals.astype(np.uint8), g))
    return QuantizedWeight(data, jnp.asarray(scale), jnp.asarray(offset), None, None, 4, g, i)
