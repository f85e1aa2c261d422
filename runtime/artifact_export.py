"""Writing an artifact (see `pallax.runtime.artifact` for the format and the loader):
trace every step for every shape bucket, export it with `jax.export`, and write the
modules, the weights, the tokenizer and the manifest through `pallax.atomic_dir`."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from pallax import atomic_dir
from pallax.runtime import artifact_engine
from pallax.runtime import generation as gen
from pallax.runtime import manifest as manifests
from pallax.runtime.artifact import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PLATFORMS,
    STOP_WIDTH,
    ExportPlan,
)


def _sizes(name: str, value, *, low: int = 1, high: int | None = None) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name}={value!r} must be a non-empty list of integers")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{name}: {v!r} must be an integer >= {low}")
        if high is not None and v > high:
            raise ValueError(f"{name}: {v} is larger than {high}, the model's context length")
    return tuple(sorted({int(v) for v in value}))


def plan_export(compiled, *, batch_sizes, prefill_sizes, cache_sizes, score_chunk) -> ExportPlan:
    ctx = compiled.config.context_length
    high = None if compiled.unbounded_context else ctx
    if cache_sizes is None:
        cache_sizes = sorted({min(s, ctx) for s in (256, 1024, 4096)} | {ctx})
    plan = ExportPlan(
        _sizes("batch_sizes", batch_sizes),
        _sizes("prefill_sizes", prefill_sizes, high=high),
        _sizes("cache_sizes", cache_sizes, low=16, high=high),
        _sizes("score_chunk", score_chunk, high=high)[0],
    )
    if plan.prefill_sizes[0] > plan.cache_sizes[-1]:
        raise ValueError(
            f"prefill_sizes={plan.prefill_sizes} are all longer than the largest cache "
            f"{plan.cache_sizes[-1]}"
        )
    return plan


def _check_platforms(platforms) -> tuple[str, ...]:
    if isinstance(platforms, str):
        platforms = (platforms,)
    if not isinstance(platforms, (list, tuple)) or not platforms:
        raise ValueError(f"platforms={platforms!r} must be a non-empty list of {PLATFORMS}")
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or len(set(platforms)) != len(platforms):
        raise ValueError(f"platforms={tuple(platforms)!r}: each one of {PLATFORMS}, once")
    return tuple(platforms)


@contextlib.contextmanager
def _cpu_kernels_off(off: bool):
    from pallax.cpu_kernels import ENV_SWITCH

    old = os.environ.get(ENV_SWITCH)
    if off:
        os.environ[ENV_SWITCH] = "0"
    try:
        yield
    finally:
        if off:
            if old is None:
                os.environ.pop(ENV_SWITCH, None)
            else:
                os.environ[ENV_SWITCH] = old


def _sds(tree):
    """Shapes and dtypes of `tree`, with the shardings of arrays split over a mesh."""

    def one(a):
        sharding = a.sharding if isinstance(getattr(a, "sharding", None), NamedSharding) else None
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def _sharded_like(tree, sharding):
    """Shapes and dtypes of `tree` with `sharding` (None: as they are)."""
    if sharding is None:
        return tree
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _mesh_record(compiled, plan) -> tuple[dict | None, object]:
    """The manifest's "mesh" entry of a sharded model (None unsharded) and the cache's
    NamedSharding; batch sizes must split over the data axis."""
    meta = compiled.pipeline_graph().meta
    mesh = meta.get("mesh")
    if mesh is None:
        return None, None
    data, tensor = mesh.shape["data"], mesh.shape["tensor"]
    bad = [b for b in plan.batch_sizes if b % data]
    if bad:
        raise ValueError(f"batch_sizes {bad} do not split over the mesh's data={data}")
    weights = compiled.weights
    specs = [list(a.sharding.spec) for a in jax.tree.leaves(weights)]
    record = {"data": data, "tensor": tensor, "devices": data * tensor,
              "weight_specs": specs, "cache_spec": list(meta["cache_spec"]),
              "head_layout": meta.get("head_layout")}  # fmt: skip
    return record, NamedSharding(mesh, meta["cache_spec"])


def _i32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def _exporter(platforms, portable: bool):
    """jax.export with the safety checks our kernels' custom calls need, and the CPU
    kernel targets the modules may call."""
    from jax import export

    from pallax.cpu_kernels import build

    targets = [] if portable or "cpu" not in platforms else sorted(build.TARGETS)
    checks = [export.DisabledSafetyCheck.custom_call(t) for t in targets]
    if "cuda" in platforms:
        checks.append(export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"))

    def run(fn, *args):
        return export.export(fn, platforms=platforms, disabled_checks=checks)(*args)

    return run, targets


def export_artifact(
    compiled,
    path,
    *,
    platforms=("cpu",),
    batch_sizes=(1,),
    prefill_sizes=(16, 128, 512),
    cache_sizes=None,
    score_chunk=128,
    portable: bool = False,
    overwrite: bool = False,
    xla_cache: bool = True,
    engine=None,
) -> pathlib.Path:
    """Write `compiled` as an artifact at `path` (see the module docstring). Everything is
    validated before anything is traced. `xla_cache`: also compile every module for this
    machine and keep the executables, which a loader on the same kind of machine uses
    instead of compiling (`runtime/artifact_compile.py`). `engine`: also the serving
    engine's steps for an engine of these limits (`runtime/artifact_engine.py`)."""
    from pallax.runtime.checkpoint import _check_free_space, _orbax_save, _pass_record
    from pallax.runtime.compiled import Buckets

    platforms = _check_platforms(platforms)
    for flag, value in (("portable", portable), ("overwrite", overwrite), ("xla_cache", xla_cache)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag}={value!r} must be a boolean")
    plan = plan_export(compiled, batch_sizes=batch_sizes, prefill_sizes=prefill_sizes,
                       cache_sizes=cache_sizes, score_chunk=score_chunk)  # fmt: skip
    passes = [_json_record(_pass_record(p)) for p in compiled.passes]
    engine_shape = artifact_engine.plan(compiled, engine)

    def check(p: pathlib.Path) -> None:
        if not p.exists() or (p.is_dir() and not any(p.iterdir())):
            return
        if not (p / MANIFEST).is_file():
            raise ValueError(
                f"{str(p)!r} exists and is not an empty directory or a pallax artifact; "
                "refusing to write an artifact there"
            )
        if not overwrite:
            raise ValueError(
                f"{str(p)!r} already holds a pallax artifact; pass overwrite=True to replace it"
            )

    mesh, cache_sharding = _mesh_record(compiled, plan)

    def fill(tmp: pathlib.Path) -> None:
        weights = compiled.weights
        _check_free_space(tmp, weights)
        (tmp / "modules").mkdir()
        run, targets = _exporter(platforms, portable)
        w = _sds(weights)
        with _cpu_kernels_off(portable):
            for b in plan.batch_sizes:
                for s in plan.cache_sizes:
                    loop_done = False
                    for t in (t for t in plan.prefill_sizes if t <= s):
                        alloc, prefill, loop = compiled._gen_fns(Buckets(b, t, 1, s))
                        cache = _sharded_like(jax.eval_shape(alloc), cache_sharding)
                        mod = run(prefill, w, cache, _i32(b, t), _i32(b), _i32(b))
                        _write_module(tmp, f"prefill-b{b}-t{t}-s{s}", mod)
                        if not loop_done:
                            state = jax.eval_shape(
                                lambda c, b=b, s=s: gen.init_state(
                                    c,
                                    jnp.zeros(b, jnp.int32),
                                    jnp.zeros(b, bool),
                                    jnp.zeros(b, jnp.int32),
                                    s,
                                ),  # fmt: skip
                                cache,
                            )._replace(cache=cache)  # eval_shape drops the shardings
                            sampling = _sds(_sampling(b))
                            mod = run(loop, w, state, sampling, _i32(b, STOP_WIDTH), _i32(b),
                                      _i32())  # fmt: skip
                            _write_module(tmp, f"decode-b{b}-s{s}", mod)
                            loop_done = True
            t = plan.score_chunk
            for s in (s for s in plan.cache_sizes if s >= t):
                alloc, chunk = compiled._score_fns(t, s)
                cache = _sharded_like(jax.eval_shape(alloc), cache_sharding)
                mod = run(chunk, w, cache, _i32(1, t), _i32(1), _i32(1, t))
                _write_module(tmp, f"score-t{t}-s{s}", mod)
            engine_record = None
            if engine_shape is not None:
                write = lambda name, mod: _write_module(tmp, name, mod)  # noqa: E731
                engine_record = artifact_engine.export(compiled, engine_shape, run, w, write)
        cache_record = _write_xla_cache(tmp, platforms, cache_sharding) if xla_cache else None
        flat = {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(weights))}
        _orbax_save(tmp / "weights", flat, f"artifact {str(path)!r}")
        compiled.tokenizer.save(tmp / "tokenizer")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION if mesh else 1,
            "versions": _versions(),
            "platforms": list(platforms),
            "config": compiled.config.to_dict(),
            "passes": passes,
            "buckets": plan.to_dict(),
            "cpu_kernel_targets": targets,
            "unbounded_context": bool(compiled.unbounded_context),
            "stop_width": STOP_WIDTH,
            "portable": portable,
            "mesh": mesh,
            "lowering": _lowering_flags(),
            "xla_cache": cache_record,
            "engine": engine_record,
        }
        manifest["files"] = manifests.file_digests(tmp)
        manifest["manifest_sha256"] = manifests.digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")

    return atomic_dir.write_dir(path, fill, check=check)


def _write_xla_cache(tmp: pathlib.Path, platforms, cache_sharding) -> dict | None:
    """Compile every module written under tmp/modules for this machine and keep the
    executables under tmp/xla; the manifest record (None: this machine's platform is not
    exported, or several processes share the run)."""
    from jax import export

    from pallax.runtime import artifact_compile as ac

    here = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    if here not in platforms or jax.process_count() > 1:
        return None
    mesh = None if cache_sharding is None else cache_sharding.mesh
    (tmp / ac.CACHE_DIR).mkdir()
    for file in sorted((tmp / "modules").iterdir()):
        module = export.deserialize(bytearray(file.read_bytes()))
        with ac.fresh_compiles():  # not from jax's cache: those serialize without code
            compiled = ac.lower(module, 1, mesh).compile()  # every step donates argument 1
        (tmp / ac.CACHE_DIR / f"{file.stem}.bin").write_bytes(ac.serialize(compiled))
    return {"key": ac.host_key(mesh)}


def _lowering_flags() -> dict:
    """The jax flags that change how modules and their kernels were lowered."""
    names = ("jax_export_calling_convention_version", "jax_export_ignore_forward_compatibility",
             "jax_pallas_use_mosaic_gpu", "jax_mosaic_allow_hlo")  # fmt: skip
    return {n: jax.config.values[n] for n in names if n in jax.config.values}


def _json_record(record: dict) -> dict:
    """A pass record the manifest can hold: devices by id (the mesh record says how they
    are laid out), anything else JSON refuses named before any tracing."""
    if record.get("devices") is not None:
        record = {**record, "devices": [getattr(d, "id", d) for d in record["devices"]]}
    try:
        json.dumps(record)
    except TypeError as e:
        raise ValueError(f"pass {record['name']!r} cannot be recorded in a manifest: {e}") from None
    return record


def _sampling(batch: int) -> dict:
    from pallax.runtime.sampling import SamplingParams, pack

    return pack([SamplingParams()], batch)


def _write_module(tmp: pathlib.Path, name: str, exported) -> None:
    (tmp / "modules" / f"{name}.jax").write_bytes(exported.serialize())


def _versions() -> dict:
    import jaxlib

    from pallax import __version__

    return {"pallax": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__}
