"""Lazy weights: read from their file only where, and when, they are placed (a kind of
weight, like `ir/qformat.py`: loaders in `model/` make them, passes and `sharding/` place
them).

`pallax.load(path, lazy=True)` gives a model whose weights are `LazyWeight`s over the
memory-mapped file (GGUF tensors, float or block-quantized, and safetensors) or over a
pallax checkpoint's arrays (orbax's zarr arrays through tensorstore, packed weights'
arrays included). With
the shard pass, each device's slice is read from the file as it is placed
(`jax.make_array_from_callback`): across processes each process reads only the slices of
its own devices, and no process holds the whole model in memory. A cast before the
shard pass stays lazy (it converts each slice as it is read); so do the shard pass's
head layout (heads padded or replicated) and llama.cpp's Q/K row order. Any other pass,
or a pipeline without the shard pass, reads the weights whole at compile time.

A block-quantized GGUF tensor is read by whole blocks: a slice of its input columns reads
the blocks that cover it (a multiple of 32 or 256 inputs), and dequantizes those.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class LazyWeight:
    """A weight of `shape` and `dtype` whose values come from `reader(slices)` (one
    `slice(start, stop)` per dimension). `reads` counts what `read` returned: [elements
    in all, elements of the largest read]."""

    def __init__(self, shape, dtype, reader: Callable, *, name: str = ""):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.name = name
        self._reader = reader
        self.reads = [0, 0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"LazyWeight({self.name!r}, shape={self.shape}, dtype={self.dtype})"

    def read(self, index=None) -> np.ndarray:
        """The values at `index`: a tuple with one slice (step 1) or integer array per
        dimension, as `jax.make_array_from_callback` passes it; None: everything."""
        index = _index(index, self.shape)
        covering, picks = [], []
        for ix, n in zip(index, self.shape, strict=True):
            if isinstance(ix, slice):
                start, stop, step = ix.indices(n)
                if step != 1:
                    raise ValueError(f"{self!r}: slices must have step 1, got {ix}")
                covering.append(slice(start, max(start, stop)))
                picks.append(None)
            else:
                arr = np.asarray(ix, np.int64)
                if arr.ndim != 1:
                    raise ValueError(f"{self!r}: index arrays must be 1-D, got shape {arr.shape}")
                if arr.size and (arr.min() < -n or arr.max() >= n):
                    raise IndexError(f"{self!r}: index out of range for a dimension of {n}")
                arr = arr % n if n else arr
                lo = int(arr.min()) if arr.size else 0
                hi = int(arr.max()) + 1 if arr.size else 0
                covering.append(slice(lo, hi))
                picks.append(arr - lo)
        if any(c.stop == c.start for c in covering):  # nothing to read
            block = np.zeros([c.stop - c.start for c in covering], self.dtype)
        else:
            block = np.asarray(self._reader(tuple(covering)))
        self.reads[0] += block.size
        self.reads[1] = max(self.reads[1], block.size)
        for axis, pick in enumerate(picks):
            if pick is not None:
                block = np.take(block, pick, axis=axis)
        return block.astype(self.dtype, copy=False)

    def astype(self, dtype) -> LazyWeight:
        """The same values converted to `dtype` as they are read."""
        return LazyWeight(self.shape, dtype, self.read, name=self.name)

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> LazyWeight:
        """`fn` (elementwise) applied to the values as they are read."""
        return LazyWeight(self.shape, self.dtype, lambda sl: fn(self.read(sl)), name=self.name,
                          )  # fmt: skip

    def gather(self, index, axis: int, unit: int) -> LazyWeight:
        """Blocks of `unit` along `axis` picked by `index` (-1: a block of zeros), as
        `sharding.heads` lays out heads; unit 1 permutes rows."""
        index = np.asarray(index, np.int64)
        shape = list(self.shape)
        shape[axis] = len(index) * unit

        def reader(slices):
            sl = slices[axis]
            pos = np.arange(sl.start, sl.stop)
            blocks = index[pos // unit] if pos.size else pos
            src = np.where(blocks >= 0, blocks * unit + pos % unit, -1)
            out_shape = [s.stop - s.start for s in slices]
            out = np.zeros(out_shape, self.dtype)
            keep = np.nonzero(src >= 0)[0]
            if keep.size:
                inner = list(slices)
                inner[axis] = src[keep]
                where = [slice(None)] * len(slices)
                where[axis] = keep
                out[tuple(where)] = self.read(tuple(inner))
            return out

        return LazyWeight(shape, self.dtype, reader, name=self.name)

    def materialize(self) -> np.ndarray:
        return self.read()


def _index(index, shape) -> tuple:
    if index is None:
        return tuple(slice(0, n) for n in shape)
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) < len(shape):
        index = index + (slice(None),) * (len(shape) - len(index))
    return index


def is_lazy(tree) -> bool:
    """Whether any weight of `tree` (a dict of weights, packed ones included) is lazy."""
    import jax

    return any(isinstance(leaf, LazyWeight) for leaf in jax.tree.leaves(tree))


# Passes that keep lazy weights lazy: a cast converts each slice as it is read; the KV
# passes and the fusion passes do not touch weights; the shard pass reads each device's
# slice as it places it.
LAZY_PASSES = ("cast", "compress_kv", "evict_kv", "fuse_projections")


def places_lazily(pipeline) -> bool:
    """Whether lazy weights stay lazy until the shard pass places them (`compile` reads
    them whole otherwise)."""
    return (
        bool(pipeline)
        and pipeline[-1].name == "shard"
        and all(p.name in LAZY_PASSES for p in pipeline[:-1])
    )


def materialize(weights: dict) -> dict:
    """Every lazy weight read whole and put on the default device."""
    import jax

    return jax.tree.map(lambda v: jax.device_put(v.read()) if isinstance(v, LazyWeight) else v,
                        weights)  # fmt: skip


# ------------------------------------------------------------------------ readers
def from_gguf(reader, t, name: str) -> LazyWeight:
    """A GGUF tensor (float or block-quantized), as float32, read on demand."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    T = GGMLQuantizationType
    shape = tuple(t.shape)

    def read(slices):
        raw = reader.raw(t)  # [rows, bytes per row], a view of the mapped file
        rows = raw.reshape(*shape[:-1], raw.shape[-1]) if len(shape) > 1 else raw[0]
        lead, last = slices[:-1], slices[-1]
        if t.ggml_type in (T.F32, T.F16, T.BF16):
            width = {T.F32: 4, T.F16: 2, T.BF16: 2}[t.ggml_type]
            part = rows[(*lead, slice(last.start * width, last.stop * width))]
            part = np.ascontiguousarray(part)
            if t.ggml_type == T.BF16:
                return (part.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            return part.view(np.float32 if t.ggml_type == T.F32 else np.float16)
        block, size = GGML_QUANT_SIZES[t.ggml_type]
        b0, b1 = last.start // block, -(-last.stop // block)
        part = np.ascontiguousarray(rows[(*lead, slice(b0 * size, b1 * size))])
        values = quants.dequantize(part, t.ggml_type)
        values = np.asarray(values, np.float32).reshape(*part.shape[:-1], (b1 - b0) * block)
        return values[..., last.start - b0 * block : last.stop - b0 * block]

    return LazyWeight(shape, np.float32, read, name=name)


def from_safetensors(file, dtype, offset: int, shape, name: str) -> LazyWeight:
    """A safetensors tensor as float32, read on demand through a memory map."""

    def read(slices):
        if 0 in shape:
            return np.zeros([s.stop - s.start for s in slices], np.float32)
        data = np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))
        return np.asarray(data[slices], np.float32)

    return LazyWeight(shape, np.float32, read, name=name)


def from_tensorstore(spec: dict, shape, dtype, name: str) -> LazyWeight:
    """An array of a tensorstore-backed checkpoint (orbax's zarr arrays; `spec` opens it),
    read by slices: tensorstore reads only the chunks that cover a slice."""
    handle = []

    def read(slices):
        import tensorstore as ts

        if not handle:
            handle.append(ts.open(spec, open=True, read=True).result())
        return np.asarray(handle[0][slices].read().result())

    return LazyWeight(shape, dtype, read, name=name)
