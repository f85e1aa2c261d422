"""Ahead-of-time artifacts: a compiled model's step functions, exported with `jax.export`,
with its weights after the pass pipeline and its tokenizer, in one directory that runs
without the model code, the passes or any tracing.

    compiled.export("smollm2-int8", batch_sizes=(1, 4))
    art = pallax.load_artifact("smollm2-int8")     # imports neither pallax.model nor passes
    art.generate(["The capital of France is"], max_new_tokens=32)

The directory (docs/ARTIFACT.md has what a loader must check):

    manifest.json   format, versions (pallax, jax, jaxlib), platforms, model config, passes,
                    shape buckets, CPU kernel targets, the sha256 of every file and of itself
    modules/        one serialized `jax.export` module per step and bucket:
                    prefill-b{B}-t{T}-s{S}, decode-b{B}-s{S} (the on-device loop), score-t{T}-s{S}
    weights/        the weights after the pass pipeline (orbax), as the modules read them
    tokenizer/      tokenizer.json (the `tokenizers` library loads it) + pallax_tokenizer.json
    xla/            optional: every module compiled by XLA on the exporting machine, used
                    only by a loader whose platform, versions and CPU are the same
                    (`runtime/artifact_compile.py`)

Shapes are static, so an artifact serves the buckets it was exported for: batch sizes,
prompt chunk lengths and cache lengths; a request that fits none is refused before
anything runs, naming the limits. `runtime/artifact_export.py` writes them, atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp

from pallax import atomic_dir
from pallax.ir import qformat  # noqa: F401 (registers QuantizedWeight for serialization)
from pallax.runtime import manifest as manifests
from pallax.runtime.generator import Generator

FORMAT = "pallax-artifact"
FORMAT_VERSION = 2  # 2: a sharded artifact's "mesh" (unsharded ones are still written as 1)
MANIFEST = "manifest.json"
PLATFORMS = ("cpu", "cuda", "tpu")
STOP_WIDTH = 16  # stop token ids per row in an exported decode loop
_KEYS = ("format", "format_version", "versions", "platforms", "config", "passes", "buckets",
         "cpu_kernel_targets", "unbounded_context", "files", "manifest_sha256")  # fmt: skip
_MODULE = re.compile(
    r"^(prefill-b\d+-t\d+-s\d+|decode-b\d+-s\d+|score-t\d+-s\d+|engine-decode-b\d+-s\d+|"
    r"engine-prefill-b\d+-t\d+-s\d+-n\d+|engine-verify-b\d+-t\d+-s\d+)$"
)


# --------------------------------------------------------------------------- export
@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """The shape buckets an artifact serves."""

    batch_sizes: tuple[int, ...]
    prefill_sizes: tuple[int, ...]
    cache_sizes: tuple[int, ...]
    score_chunk: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_sha256 = manifests.sha256


_digest = manifests.digest


# ---------------------------------------------------------------------------- load
@dataclasses.dataclass(frozen=True)
class ArtifactConfig:
    """What generation needs of the model config (the whole of it is `config_dict`)."""

    name: str
    arch: str
    vocab_size: int
    context_length: int
    config_dict: dict = dataclasses.field(repr=False, compare=False)


class ArtifactError(ValueError):
    """An artifact that cannot be loaded here: corrupt, incomplete or made elsewhere."""


def load_artifact(path) -> Artifact:
    """An exported artifact, ready to `generate`, `stream` and `score`. The manifest and
    every file's checksum are checked before any weight is put on a device."""
    return Artifact(path)


class Artifact(Generator):
    """`generate`, `stream` and `score` from an artifact's exported modules."""

    def __init__(self, path):
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"artifact path must be a path, got {path!r}")
        atomic_dir.recover(path)
        self.path = pathlib.Path(path).absolute()
        self._origin = f"pallax artifact {str(self.path)!r}"
        manifest = self._read_manifest()
        self.manifest = manifest
        self._verify_files(manifest)
        self._check_platform(manifest)
        c = manifest["config"]
        self.config = ArtifactConfig(
            c.get("name") or "", c["arch"], int(c["vocab_size"]), int(c["context_length"]), c
        )
        self.unbounded_context = bool(manifest["unbounded_context"])
        self._stop_width = int(manifest.get("stop_width", STOP_WIDTH))
        b = manifest["buckets"]
        self.plan = ExportPlan(tuple(b["batch_sizes"]), tuple(b["prefill_sizes"]),
                               tuple(b["cache_sizes"]), int(b["score_chunk"]))  # fmt: skip
        self.mesh = self._mesh(manifest.get("mesh"))
        self._register_cpu_kernels(manifest["cpu_kernel_targets"])
        from pallax.text.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.load(self.path / "tokenizer")
        self._modules: dict[str, object] = {}
        self._fns: dict = {}
        self.xla_cache = self._xla_cache_status(manifest.get("xla_cache"))
        self.xla_cache_hits: list[str] = []  # modules whose executable came from xla/
        first = self._module(self._module_names()[0])
        (weights_avals, *_), _ = jax.tree.unflatten(first.in_tree, first.in_avals)
        self.weights = self._restore_weights(weights_avals)

    def __repr__(self) -> str:
        return (
            f"Artifact({str(self.path)!r}, model={self.config.name or self.config.arch!r}, "
            f"platforms={self.manifest['platforms']}, buckets={self.plan})"
        )

    # ------------------------------------------------------------------ checks
    def _fail(self, message: str) -> ArtifactError:
        return ArtifactError(f"{self._origin}: {message}")

    def _read_manifest(self) -> dict:
        file = self.path / MANIFEST
        if not file.is_file():
            raise FileNotFoundError(f"{str(self.path)!r} is not a pallax artifact: no {MANIFEST}")
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._fail(f"{MANIFEST} is not valid JSON: {e}") from None
        if not isinstance(manifest, dict):
            raise self._fail(f"{MANIFEST} must hold a JSON object")
        if manifest.get("format") != FORMAT:
            raise self._fail(f"format={manifest.get('format')!r}, expected {FORMAT!r}")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise self._fail(f"invalid format_version={version!r}")
        if version > FORMAT_VERSION:
            raise self._fail(
                f"format_version {version} was written by a newer pallax "
                f"({manifest.get('versions', {}).get('pallax')}); this pallax reads "
                f"{FORMAT_VERSION}"
            )
        missing = [k for k in _KEYS if k not in manifest]
        if missing:
            raise self._fail(f"{MANIFEST} lacks the keys {missing}")
        if manifest["manifest_sha256"] != _digest(manifest):
            raise self._fail(
                f"{MANIFEST} was changed after it was written (its manifest_sha256 does not "
                "match its contents)"
            )
        return manifest

    def _verify_files(self, manifest: dict) -> None:
        files = manifest["files"]
        unlisted = manifests.unlisted(self.path, files, MANIFEST)
        if unlisted:
            raise self._fail(f"files not listed in {MANIFEST}: {unlisted[:5]}")
        for name, digest in files.items():
            if not isinstance(name, str) or ".." in pathlib.PurePosixPath(name).parts:
                raise self._fail(f"bad file name {name!r} in {MANIFEST}")
            f = self.path / name
            if not f.is_file():
                raise self._fail(f"the file {name} is missing")
            if _sha256(f) != digest:
                raise self._fail(f"the file {name} is corrupted (its sha256 differs)")

    def _check_platform(self, manifest: dict) -> None:
        here = jax.default_backend()
        here = {"gpu": "cuda"}.get(here, here)
        if here not in manifest["platforms"]:
            raise self._fail(
                f"exported for {', '.join(manifest['platforms'])}; this machine runs {here}"
            )

    def _mesh(self, record):
        """The ("data", "tensor") mesh a sharded artifact was exported for, over this
        process's view of the devices; a different device count is refused."""
        if record is None:
            return None
        try:
            data, tensor = int(record["data"]), int(record["tensor"])
            self._weight_specs = [tuple(s) for s in record["weight_specs"]]
            self._cache_spec = tuple(record["cache_spec"])
        except (KeyError, TypeError, ValueError):
            raise self._fail(f"its mesh record {str(record)[:200]} is malformed") from None
        devices = jax.devices()
        if len(devices) != data * tensor:
            raise self._fail(
                f"exported for a mesh of tensor={tensor} x data={data} ({data * tensor} "
                f"devices); this run has {len(devices)} {devices[0].platform} devices"
            )
        from pallax.sharding.mesh import make_mesh

        return make_mesh(tensor, data, devices)

    def _sharding(self, spec):
        from jax.sharding import NamedSharding, PartitionSpec

        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def _register_cpu_kernels(self, targets) -> None:
        if not targets or jax.default_backend() != "cpu":
            return
        from pallax.cpu_kernels import build

        if not build.ensure_registered():
            raise self._fail(
                f"its CPU modules call pallax's C++ kernels ({', '.join(targets)}), which "
                "cannot be built here (no C++ compiler?); export with portable=True for "
                "modules without them"
            )

    # ----------------------------------------------------------------- modules
    def _module_names(self) -> list[str]:
        return sorted(
            n.removeprefix("modules/").removesuffix(".jax")
            for n in self.manifest["files"]
            if n.startswith("modules/")
        )

    def _module(self, name: str):
        mod = self._modules.get(name)
        if mod is None:
            from jax import export

            if not _MODULE.match(name) or f"modules/{name}.jax" not in self.manifest["files"]:
                raise self._fail(f"it has no module {name!r}")
            data = (self.path / "modules" / f"{name}.jax").read_bytes()
            try:
                mod = export.deserialize(bytearray(data))
            except Exception as e:  # flatbuffers and jax raise many kinds for a bad module
                v = self.manifest["versions"]
                raise self._fail(
                    f"cannot read module modules/{name}.jax (exported with jax "
                    f"{v.get('jax')}, this is jax {jax.__version__}): {e}"
                ) from None
            low = export.minimum_supported_calling_convention_version
            high = export.maximum_supported_calling_convention_version
            version = mod.calling_convention_version
            if not low <= version <= high:
                v = self.manifest["versions"]
                raise self._fail(
                    f"module modules/{name}.jax uses jax.export calling convention {version}; "
                    f"this jax {jax.__version__} runs {low} to {high} (it was exported with "
                    f"jax {v.get('jax')}): export it again with a jax in that window"
                )
            self._modules[name] = mod
        return mod

    def _restore_weights(self, avals):
        import orbax.checkpoint as ocp

        leaves, treedef = jax.tree.flatten(avals)
        if self.mesh is None:
            where = [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * len(leaves)
        else:  # each device reads its own slices
            if len(self._weight_specs) != len(leaves):
                raise self._fail(
                    f"its mesh record has {len(self._weight_specs)} weight specs for "
                    f"{len(leaves)} weight arrays"
                )
            where = [self._sharding(spec) for spec in self._weight_specs]
        target = {
            f"{i:05d}": jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)
            for i, (a, sh) in enumerate(zip(leaves, where, strict=True))
        }
        try:
            with ocp.StandardCheckpointer() as ckpt:
                restored = ckpt.restore(self.path / "weights", target)
        except Exception as e:  # orbax and tensorstore raise many types for unreadable files
            detail = (str(e).splitlines() or [type(e).__name__])[0][:300]
            raise self._fail(f"cannot read the weights: {detail}") from e
        return jax.tree.unflatten(treedef, [restored[k] for k in sorted(restored)])

    # ---------------------------------------------------------------- engine
    def engine_shape(self, **limits):
        """The `EngineShape` of `pallax.Engine(self, **limits)` (runtime/artifact_engine.py)."""
        from pallax.runtime import artifact_engine

        return artifact_engine.engine_shape(self, **limits)

    def slot_steps(self, shape, paged=None):
        """The serving engine's steps: this artifact's engine modules (slot caches)."""
        from pallax.runtime.artifact_engine import ArtifactSlotSteps

        return ArtifactSlotSteps(self, shape)

    # ---------------------------------------------------------- generator hooks
    def _buckets(self, reqs):
        p = self.plan
        n = len(reqs)
        widths = max(len(r.stop_ids) for r in reqs)
        if widths > self._stop_width:
            raise ValueError(
                f"a request has {widths} stop token ids; this artifact's decode loop takes "
                f"{self._stop_width}"
            )
        batch = next((b for b in p.batch_sizes if b >= n), None)
        if batch is None:
            raise ValueError(
                f"{n} prompts: this artifact was exported for batch sizes {p.batch_sizes}"
            )
        longest = max(len(r.prompt_ids) for r in reqs)
        want = 1 << max(0, (longest - 1).bit_length())
        prefill = next((t for t in p.prefill_sizes if t >= want), p.prefill_sizes[-1])
        chunks = -(-longest // prefill)
        need = max(len(r.prompt_ids) + r.max_new_tokens for r in reqs)
        floor = chunks * prefill if self.unbounded_context else max(need, chunks * prefill)
        cache = next(
            (s for s in p.cache_sizes if s >= floor and f"prefill-b{batch}-t{prefill}-s{s}"
             in self._module_names_set()),
            None,
        )  # fmt: skip
        if cache is None:
            raise ValueError(
                f"prompts of up to {longest} tokens with {need} tokens in all need a cache of "
                f"{floor}; this artifact was exported for cache sizes {p.cache_sizes}"
            )
        return _Bucket(batch, prefill, chunks, cache)

    def _module_names_set(self) -> set[str]:
        names = self._fns.get("names")
        if names is None:
            names = self._fns["names"] = set(self._module_names())
        return names

    def _xla_cache_status(self, record) -> str:
        """ "used" when the artifact's executables fit this process, else why not."""
        if not record:
            return "absent: exported without xla_cache"
        from pallax.runtime import artifact_compile

        if not isinstance(record, dict) or not isinstance(record.get("key"), dict):
            raise self._fail(f"its xla_cache record {str(record)[:200]} is malformed")
        why = artifact_compile.key_mismatch(record["key"], artifact_compile.host_key(self.mesh))
        return "used" if why is None else f"not used: {why}"

    def _call(self, name: str, donate: int):
        """The module `name` as a function, compiled (or read from xla/) on its first call:
        a generation of one token never compiles the decode loop."""
        key = ("call", name)
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = _OnFirstCall(lambda: self._compile(name, donate))
        return fn

    def _compile(self, name: str, donate: int):
        """The module's executable: from xla/ where it fits this machine, else compiled; a
        module XLA refuses is reported with the kernels it holds."""
        from pallax.runtime import artifact_compile as ac

        module = self._module(name)
        lowered = ac.lower(module, donate, self.mesh)
        cached = f"{ac.CACHE_DIR}/{name}.bin"
        if self.xla_cache == "used" and cached in self.manifest["files"]:
            try:
                fn = ac.deserialize((self.path / cached).read_bytes(), lowered, self.mesh)
            except Exception as e:  # a cache: any failure falls back to compiling
                warnings.warn(
                    f"{self._origin}: {cached} could not be loaded ({str(e)[:200]}); "
                    "compiling the module instead",
                    stacklevel=3,
                )
            else:
                self.xla_cache_hits.append(name)
                return fn
        try:
            return lowered.compile()
        except Exception as e:  # XLA and the kernel compilers raise many kinds
            platform = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
            message = ac.compile_failure(f"modules/{name}.jax", platform, module.mlir_module(), e)
            raise self._fail(message) from e

    def _alloc(self, name: str, index: int):
        mod = self._module(name)
        args, _ = jax.tree.unflatten(mod.in_tree, mod.in_avals)
        avals = args[index]
        where = None if self.mesh is None else self._sharding(self._cache_spec)
        return lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=where), avals)

    def _gen_fns(self, b):
        prefill = f"prefill-b{b.batch}-t{b.prefill}-s{b.cache}"
        decode = f"decode-b{b.batch}-s{b.cache}"
        return self._alloc(prefill, 1), self._call(prefill, 1), self._call(decode, 1)

    def _score_plan(self, n: int, chunk_size: int) -> tuple[int, int]:
        ctx = self.config.context_length
        if n > ctx and not self.unbounded_context:
            raise ValueError(f"text has {n} tokens; the context length is {ctx}")
        t = self.plan.score_chunk
        need = -(-n // t) * t
        s = next((s for s in self.plan.cache_sizes if s >= need), None)
        if s is None or f"score-t{t}-s{s}" not in self._module_names_set():
            raise ValueError(
                f"text of {n} tokens: this artifact scores up to "
                f"{max(self.plan.cache_sizes)} tokens in chunks of {t}"
            )
        return t, s

    def _score_fns(self, t: int, s: int):
        name = f"score-t{t}-s{s}"
        return self._alloc(name, 1), self._call(name, 1)


class _OnFirstCall:
    """A function built by `build()` when first called."""

    def __init__(self, build):
        import threading

        self._build, self._fn, self._lock = build, None, threading.Lock()

    def __call__(self, *args):
        if self._fn is None:
            with self._lock:
                if self._fn is None:
                    self._fn = self._build()
        return self._fn(*args)


@dataclasses.dataclass(frozen=True)
class _Bucket:
    batch: int
    prefill: int
    chunks: int
    cache: int
