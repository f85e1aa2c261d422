"""pallax checkpoints: a model's weights after its pass pipeline, saved and loaded back
(in the runtime, because a checkpoint records its passes and loading rebuilds them).

A checkpoint is a directory:
  pallax_checkpoint.json  format version, config, passes applied, weight shapes and dtypes,
                          source, and the sha256 of every other file
  tokenizer/              written by `Tokenizer.save`
  weights/                the weights, bit for bit, written by orbax-checkpoint
`load_checkpoint` returns a `Model` whose `passes` are those its weights went through, so
`pallax.compile(model)` rebuilds the compiled model that was saved, without the original file.
The checksums are checked before restoring: orbax does not notice a flipped bit, and reports a
truncated file as a tensorstore error from deep inside the restore.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from pallax import atomic_dir
from pallax.ir import qformat
from pallax.ir.qformat import QuantizedWeight
from pallax.model import architectures
from pallax.model.configs import ModelConfig
from pallax.runtime import manifest as manifests

MANIFEST = "pallax_checkpoint.json"
FORMAT = "pallax-checkpoint"
FORMAT_VERSION = 3
# 2: packed (quantized) weights, stored as their arrays
# 3: "manifest_sha256", the digest of the manifest itself (config, passes, weights, files)
PACKED_FIELDS = ("data", "scale", "offset", "outlier_idx", "outlier_w")
TOKENIZER_DIR = "tokenizer"
WEIGHTS_DIR = "weights"
_KEYS = (
    "format", "format_version", "pallax_version", "config", "passes", "weights", "source", "files",
)  # fmt: skip


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory with a pallax checkpoint manifest."""
    return (pathlib.Path(path) / MANIFEST).is_file()


def save_checkpoint(compiled_or_model, path: str | os.PathLike, *, overwrite: bool = False):
    """Write a `CompiledModel` (its weights after the pass pipeline) or a `Model` to the
    directory `path`. `path` must not exist, be empty, or (with `overwrite=True`) hold a
    pallax checkpoint, which is replaced once the new one is complete."""
    from pallax import __version__
    from pallax.model.loaded import Model
    from pallax.runtime.compiled import CompiledModel

    if isinstance(compiled_or_model, CompiledModel):
        model, passes = compiled_or_model.model, compiled_or_model.passes
        weights = compiled_or_model.weights  # after the pass pipeline
    elif isinstance(compiled_or_model, Model):
        from pallax.ir import lazy

        model = compiled_or_model
        passes, weights = model.passes, lazy.materialize(model.weights)  # lazy: read whole
    else:
        raise TypeError(
            f"expected a CompiledModel or Model, got {type(compiled_or_model).__name__}"
        )
    entries, stored = {}, {}
    for name, w in weights.items():
        if isinstance(w, QuantizedWeight):
            arrays = {f: getattr(w, f) for f in PACKED_FIELDS if getattr(w, f) is not None}
            stored[name] = arrays
            entries[name] = {
                "shape": list(w.shape),
                "dtype": "packed",
                "bits": w.bits,
                "group_size": w.group_size,
                "in_features": w.in_features,
                "arrays": {f: _entry(a) for f, a in arrays.items()},
            }
        elif isinstance(w, jax.Array):
            stored[name], entries[name] = w, _entry(w)
        else:
            raise ValueError(f"weight {name!r} is a {type(w).__name__}; checkpoints store arrays")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pallax_version": __version__,
        "config": model.config.to_dict(),
        # fusion passes change the graph, not the weights: compile runs them by default
        "passes": [_pass_record(p) for p in passes if not getattr(p, "fusion", False)],
        "weights": entries,
        "source": model.source,
    }

    def check(p: pathlib.Path) -> None:
        _check_destination(p, overwrite)

    def fill(partial: pathlib.Path) -> None:
        _check_free_space(partial, stored)
        model.tokenizer.save(partial / TOKENIZER_DIR)
        _orbax_save(partial / WEIGHTS_DIR, stored, f"checkpoint {str(path)!r}")
        manifest["files"] = manifests.file_digests(partial)
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")

    return atomic_dir.write_dir(path, fill, check=check)


def _check_free_space(directory: pathlib.Path, stored: dict) -> None:
    """Refuse before writing when the weights cannot fit (orbax fails late and noisily)."""
    need = sum(a.nbytes for a in jax.tree.leaves(stored))
    free = shutil.disk_usage(directory).free
    if need + (16 << 20) > free:
        raise OSError(
            errno.ENOSPC,
            f"not enough disk space to save a checkpoint in {str(directory.parent)!r}: the "
            f"weights need {need / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free",
        )


def _orbax_save(directory: pathlib.Path, stored: dict, what: str) -> None:
    """orbax's save, with its failures as one clean exception: its writer threads log each
    failure with a traceback and tensorstore reports hundreds of `Event loop is closed`
    callbacks once the loop that awaited them is gone."""
    with _quiet_orbax():
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(directory, stored)
                checkpointer.wait_until_finished()
        except Exception as e:
            text = str(e)
            first = (text.splitlines() or [type(e).__name__])[0][:300]
            if "No space left" in text or "os_error_code='28'" in text:
                raise OSError(
                    errno.ENOSPC, f"disk full while saving the weights of {what}; it is unchanged"
                ) from None
            if "File too large" in text or "os_error_code='27'" in text:
                raise OSError(
                    errno.EFBIG,
                    f"a file size limit stopped saving the weights of {what}; it is unchanged",
                ) from None
            raise OSError(f"cannot save the weights of {what}: {first}") from None


class _DropOrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "orbax" not in record.pathname


class _DropOrbaxTaskErrors(logging.Filter):
    """asyncio's "Task exception was never retrieved" for orbax's failed writer tasks,
    logged when the task is collected, possibly after the save has returned."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        tb = exc.__traceback__ if exc is not None else None
        while tb is not None:
            if "orbax" in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return "orbax" not in record.getMessage()


def _drop_closed_loop_callbacks(previous):
    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook.pallax_filter = True
    return hook


@contextlib.contextmanager
def _quiet_orbax():
    if not getattr(sys.unraisablehook, "pallax_filter", False):
        # Stays installed: the callbacks can arrive after the save has returned.
        sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)
        logging.getLogger("asyncio").addFilter(_DropOrbaxTaskErrors())
    log, drop = logging.getLogger("absl"), _DropOrbaxErrors()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


_manifest_digest = manifests.digest


def _entry(a) -> dict:
    return {"shape": list(a.shape), "dtype": a.dtype.name}


def _sds(e) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(e["shape"]), jnp.dtype(e["dtype"]))


def _check_destination(path: pathlib.Path, overwrite: bool) -> None:
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not is_checkpoint(path):
        raise ValueError(
            f"{str(path)!r} exists and is not an empty directory or a pallax checkpoint "
            f"(no {MANIFEST}); refusing to write a checkpoint there"
        )
    if not overwrite:
        raise ValueError(
            f"{str(path)!r} already holds a pallax checkpoint; pass overwrite=True to replace it"
        )


def _pass_record(p) -> dict:
    if not dataclasses.is_dataclass(p):
        raise ValueError(f"pass {p!r} is not a dataclass, so a checkpoint cannot record it")
    return {"name": p.name, **{f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.init}}


def load_checkpoint(path: str | os.PathLike, *, lazy: bool = False):
    """The `Model` saved at `path`: weights as saved (dtypes kept) and the passes applied.
    lazy=True: every array a `LazyWeight` read by slices where it is placed (the files'
    checksums are still verified first, reading them as a stream)."""
    from pallax.model.loaded import Model
    from pallax.text.tokenizer import Tokenizer

    atomic_dir.recover(path)
    path = pathlib.Path(path).absolute()
    origin = f"pallax checkpoint {str(path)!r}"
    manifest = _read_manifest(path)
    try:
        config = ModelConfig.from_dict(manifest["config"])
        abstract, shapes = {}, {}
        for name, e in manifest["weights"].items():
            if e["dtype"] == "packed":
                abstract[name] = {f: _sds(a) for f, a in e["arrays"].items()}
                shapes[name] = jax.ShapeDtypeStruct(tuple(e["shape"]), jnp.float32)
            else:
                abstract[name] = shapes[name] = _sds(e)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{origin}: bad config or weights in {MANIFEST}: {e}") from None
    passes = tuple(_rebuild_pass(entry, origin) for entry in manifest["passes"])
    # A quantize pass lives on in the packed weights (compiling a model with packed weights
    # rewrites its linears to qlinear); running it again would quantize twice.
    passes = tuple(p for p in passes if p.name != "quantize_weights")
    for sub in (TOKENIZER_DIR, WEIGHTS_DIR):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"{origin}: the {sub}/ directory is missing")
    architectures.check_weights(shapes, config, f"{origin} ({MANIFEST})")
    unlisted = manifests.unlisted(path, manifest["files"], MANIFEST)
    if unlisted:
        raise ValueError(
            f"{origin}: files not listed in {MANIFEST} (so not verified): {unlisted[:5]}; "
            "a checkpoint holds only the files its manifest lists"
        )
    for name, digest in manifest["files"].items():
        if not isinstance(name, str) or ".." in pathlib.PurePosixPath(name).parts:
            raise ValueError(f"{origin}: bad file name {name!r} in {MANIFEST}")
        if not (path / name).is_file():
            raise FileNotFoundError(f"{origin}: the file {name} is missing")
        if _sha256(path / name) != digest:
            raise ValueError(f"{origin}: the file {name} is corrupted (its sha256 differs)")
    tokenizer = Tokenizer.load(path / TOKENIZER_DIR)
    weights = _restore_weights(path / WEIGHTS_DIR, abstract, origin, lazy=lazy)
    for name, e in manifest["weights"].items():
        if e["dtype"] == "packed":
            arrays = {f: weights[name].get(f) for f in PACKED_FIELDS}
            weights[name] = QuantizedWeight(
                **arrays, bits=e["bits"], group_size=e["group_size"], in_features=e["in_features"]
            )
            try:
                qformat.check(weights[name])
            except TypeError as err:
                raise ValueError(f"{origin}: packed weight {name!r}: {err}") from None
    return Model(config, weights, tokenizer, source=str(path), passes=passes)


def _read_manifest(path: pathlib.Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a pallax checkpoint: it has no {MANIFEST}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(file)!r} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{str(file)!r} must hold a JSON object")
    missing = [k for k in _KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{str(file)!r} lacks the keys {missing}")
    if manifest["format"] != FORMAT:
        raise ValueError(f"{str(file)!r} has format={manifest['format']!r}, expected {FORMAT!r}")
    version = manifest["format_version"]
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{str(file)!r} has an invalid format_version={version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{str(file)!r} was written by a newer pallax ({manifest['pallax_version']}): "
            f"format_version {version}, this pallax reads {FORMAT_VERSION}"
        )
    for key, kind in (("passes", list), ("weights", dict), ("files", dict)):
        if not isinstance(manifest[key], kind):
            raise ValueError(f"{str(file)!r}: {key!r} must be a JSON {kind.__name__}")
    if version >= 3:
        digest = manifest.get("manifest_sha256")
        if digest != _manifest_digest(manifest):
            raise ValueError(
                f"{str(file)!r} was changed after it was written (its manifest_sha256 "
                f"{'is missing' if digest is None else 'does not match its contents'}): "
                "the config, passes, weights and file list it holds cannot be trusted"
            )
    return manifest


_sha256 = manifests.sha256


def _rebuild_pass(entry, origin: str):
    from pallax.passes import PASS_FACTORIES

    fields = dict(entry) if isinstance(entry, dict) else {}
    name = fields.pop("name", None)
    factory = PASS_FACTORIES.get(name)
    if factory is None:
        raise ValueError(
            f"{origin}: unknown pass {name!r} in {MANIFEST}; this pallax knows "
            f"{sorted(PASS_FACTORIES)}"
        )
    try:
        return dataclasses.replace(factory(), **fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{origin}: cannot rebuild pass {entry!r} from {MANIFEST}: {e}") from None


def _restore_weights(directory: pathlib.Path, abstract: dict, origin: str, lazy=False) -> dict:
    """Restore with the manifest's shapes and dtypes, after checking orbax's own metadata
    agrees (orbax would otherwise convert a stored dtype to the requested one); lazy:
    LazyWeights over the stored arrays instead."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract
    )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(directory).item_metadata
            if metadata is None:
                raise ValueError("orbax finds no weights metadata there")
            stored = dict(metadata.tree)
            if set(stored) != set(abstract):
                raise ValueError(
                    f"the stored weights {sorted(set(stored) ^ set(abstract))[:5]} differ from "
                    f"the {MANIFEST} weights"
                )
            flat_stored = dict(_flat(stored))
            for name, a in _flat(abstract):
                if name not in flat_stored:
                    raise ValueError(f"weight array {name!r} is not stored")
                s = flat_stored[name]
                got = (tuple(s.shape), jnp.dtype(s.dtype))
                if got != (a.shape, a.dtype):
                    raise ValueError(
                        f"weight {name!r} is stored as {got[1].name}{list(got[0])} but "
                        f"{MANIFEST} says {a.dtype.name}{list(a.shape)}"
                    )
            if lazy:
                return _lazy_arrays(directory, abstract)
            return checkpointer.restore(directory, target)
    except Exception as e:  # orbax and tensorstore raise many types for unreadable files
        detail = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(
            f"{origin}: cannot read the weights in {str(directory)!r}: {detail}"
        ) from e


def _lazy_arrays(directory: pathlib.Path, abstract: dict) -> dict:
    """`abstract`'s tree with a LazyWeight over each stored array: orbax keeps each as a
    zarr array named by its tree path joined with ".", in an OCDBT store by default."""
    from pallax.ir.lazy import from_tensorstore

    meta = json.loads((directory / "_METADATA").read_text(encoding="utf-8"))
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"

    def lazy(keys, a):
        key = ".".join(keys)
        if meta.get("use_ocdbt", True):
            base = {"driver": "file", "path": f"{directory}/"}
            store = {"driver": "ocdbt", "base": base, "path": key}
        else:
            store = {"driver": "file", "path": str(directory / key)}
        return from_tensorstore({"driver": driver, "kvstore": store}, a.shape, a.dtype,
                                "/".join(keys))  # fmt: skip

    return {name: ({f: lazy((name, f), a) for f, a in v.items()} if isinstance(v, dict)
                   else lazy((name,), v)) for name, v in abstract.items()}  # fmt: skip


def _flat(tree: dict, prefix: str = ""):
    """(name, leaf) pairs of a nested weights dict: "embed", "layers.0.wq/scale", ..."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v
