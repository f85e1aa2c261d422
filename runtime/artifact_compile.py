"""Compiling an artifact's modules: the XLA executables an artifact may carry for the
machine that exported it, and the message a loader gives when a module does not compile.

An exported module still has to be compiled by XLA on every start, which is most of a cold
start once tracing and the passes are gone. `export(..., xla_cache=True)` compiles every
module on the exporting machine and keeps the executables under `xla/` with a key
(`host_key`): platform, jax and jaxlib versions, device kind and count, process count,
XLA_FLAGS and, on CPU, a hash of the CPU's model and feature flags (XLA:CPU compiles for
the host it runs on). A loader uses them only where its own key is the same; anywhere else
it compiles the module as usual, so the cache can make a start faster and never wrong.
Executables are read with `jax.experimental.serialize_executable`, which unpickles: an
artifact is trusted code (its modules already carry compiled kernels).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re

import jax

CACHE_DIR = "xla"

# Kernel calls in a module's StableHLO: the custom-call target, then where the kernel's
# own name is written for each kind.
_CALL = re.compile(r"stablehlo\.custom_call @([\w$.]+)\((.*)$", re.M)
_TPU_NAME = re.compile(r'kernel_name = "([^"]+)"')
_TRITON_NAME = re.compile(r'\bname = "([^"]+)"')
_LOC_REF = re.compile(r"loc\((#loc\d+)\)\s*$")
_LOC_DEF = re.compile(r"^(#loc\d+) = loc\(\"([^\"]*)\"", re.M)


def host_key(mesh=None) -> dict:
    """What an executable compiled in this process depends on (see the module docstring)."""
    import jaxlib

    devices = jax.devices()
    key = {
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "processes": jax.process_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "mesh_devices": None if mesh is None else [int(d.id) for d in mesh.devices.flat],
    }
    key["platform_version"] = devices[0].client.platform_version  # libtpu, CUDA builds
    key["libtpu_init_args"] = os.environ.get("LIBTPU_INIT_ARGS", "")
    if key["platform"] == "cpu":
        fingerprint = _cpu_features()
        # An unknown CPU never matches: an executable must not run where its instructions
        # might be missing.
        key["host"] = hashlib.sha256(fingerprint.encode()).hexdigest() if fingerprint else None
    return key


def _cpu_features() -> str:
    """The CPU's model and feature lines of /proc/cpuinfo (x86: model name, flags; ARM:
    Features, CPU implementer / part / variant); "" where there are none (then the
    executables are never reused)."""
    keys = ("flags", "model name", "Features", "CPU implementer", "CPU part", "CPU variant")
    try:
        with open("/proc/cpuinfo") as f:
            lines = {ln.strip() for ln in f if ln.startswith(keys)}
    except OSError:
        return ""
    return "\n".join(sorted(lines))


def key_mismatch(recorded: dict, here: dict) -> str | None:
    """None when the executables recorded under `recorded` can run here; else which part of
    the key differs, with both values."""
    order = ("platform", "jax", "jaxlib", "processes", "devices", "device_kind", "host")
    for k in [*order, *sorted((set(recorded) | set(here)) - set(order))]:
        a, b = recorded.get(k), here.get(k)
        if k == "host" and (a is None or b is None):
            return "the CPU's features are unknown (no /proc/cpuinfo model or feature lines)"
        if a != b:
            if k == "host":
                return "the CPU model or feature flags differ"
            return f"{k} differs (exported with {a!r}, here {b!r})"
    return None


def lower(module, donate: int, mesh=None):
    """`jax.jit(module.call)` lowered for the module's own argument shapes (and, sharded,
    its shardings over `mesh`): the same lowering on the exporting and the loading side,
    so a cached executable fits it."""
    (args, kwargs) = jax.tree.unflatten(module.in_tree, module.in_avals)
    flat, treedef = jax.tree.flatten(args)
    if mesh is None:
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in flat]
    else:
        shardings = module.in_shardings_jax(mesh)
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                 for a, s in zip(flat, shardings, strict=True)]  # fmt: skip
    return jax.jit(module.call, donate_argnums=(donate,)).lower(
        *jax.tree.unflatten(treedef, specs), **kwargs
    )


@contextlib.contextmanager
def fresh_compiles():
    """Compiles in this block bypass jax's persistent compilation cache
    (`jax_compilation_cache_dir`): an XLA:CPU executable that came from that cache
    serializes without its code, and run from an artifact it fails with "Function ...
    not found". The executables an artifact keeps are compiled here; the cache is back
    on (as configured) after the block. Not thread-safe against other compiles of the
    process, which compile without the cache meanwhile."""
    from jax._src import compilation_cache

    if not compilation_cache.is_persistent_cache_enabled():
        yield
        return
    compilation_cache.reset_cache()  # is_cache_used() is decided once, then remembered
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.reset_cache()


def serialize(compiled) -> bytes:
    from jax.experimental import serialize_executable

    data, _, _ = serialize_executable.serialize(compiled)
    return data


def deserialize(data: bytes, lowered, mesh=None):
    """The executable `data` as a callable like `lowered.compile()`: on the first device,
    or on the mesh's devices in the mesh's order, as `lower` placed it."""
    from jax.experimental import serialize_executable

    default = jax.config.jax_default_device
    default = default if isinstance(default, jax.Device) else jax.devices()[0]
    devices = [default] if mesh is None else list(mesh.devices.flat)
    return serialize_executable.deserialize_and_load(
        data, jax.tree.structure(lowered.args_info), lowered.out_tree, execution_devices=devices
    )


def kernels_in(module_text: str) -> dict[str, list[str]]:
    """Kernel calls in a module's StableHLO, by custom-call target: the names of the Pallas
    kernels (Mosaic TPU `kernel_name`, Triton `name`, Mosaic GPU from the call's location)
    and pallax's C++ CPU kernels (named by their targets)."""
    locs = dict(_LOC_DEF.findall(module_text))
    found: dict[str, set[str]] = {}
    for target, rest in _CALL.findall(module_text):
        if target == "tpu_custom_call":
            m = _TPU_NAME.search(rest)
            name = m.group(1) if m else "?"
        elif target.startswith("__gpu$xla.gpu.triton"):
            m = _TRITON_NAME.search(rest)
            name = m.group(1) if m else "?"
        elif target.startswith("mosaic_gpu"):
            ref = _LOC_REF.search(rest)
            scope = locs.get(ref.group(1), "") if ref else ""
            parts = [p for p in scope.split("/") if p not in ("mpmd_map", "pallas_call")]
            name = parts[-1] if parts else "?"
        elif target.startswith("pallax_"):
            name = target
        else:
            continue
        found.setdefault(target, set()).add(name)
    return {t: sorted(names) for t, names in sorted(found.items())}


_PLATFORM_TARGETS = {"cpu": ("pallax_",), "cuda": ("mosaic_gpu", "__gpu$"), "tpu": ("tpu_",)}


def compile_failure(module_file: str, platform: str, module_text: str, error: Exception) -> str:
    """Why `module_file` did not compile on `platform`: the kernel the compiler named, or
    every kernel of that platform the module holds, with the compiler's words."""
    detail = " ".join(str(error).split())[:600] or type(error).__name__
    prefixes = _PLATFORM_TARGETS.get(platform, ("",))
    kernels = {t: ns for t, ns in kernels_in(module_text).items() if t.startswith(prefixes)}
    names = sorted({n for ns in kernels.values() for n in ns})
    named = [n for n in names if n != "?" and re.search(rf"\b{re.escape(n)}\b", str(error))]
    if named:
        which = f"its kernel {', '.join(named)} failed"
    elif names:
        listing = "; ".join(f"{t}: {', '.join(ns)}" for t, ns in kernels.items())
        which = f"its kernels are {listing}"
    else:
        which = "it holds no Pallas or pallax kernel (an XLA error)"
    if platform == "cpu" and not names:
        hint = "XLA:CPU refused it; the module was exported by another jax or machine"
    elif platform == "cpu":
        hint = ("pallax's C++ kernels are registered by the loader; an artifact exported with "
                "portable=True has none")  # fmt: skip
    else:
        hint = ("a Mosaic kernel exported with one jax can fail to compile with another "
                "(jax-ml/jax#34936): the manifest's versions and lowering flags say how it "
                "was made")  # fmt: skip
    return (
        f"cannot compile {module_file} for {platform}: {which}. The compiler said: {detail}. "
        + (hint[0].upper() + hint[1:])
    )
