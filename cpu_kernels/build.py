"""Compile the package's C++ source on first use and register its XLA FFI targets.

The shared library is cached under `$PALLAX_CACHE/kernels` (default
`~/.cache/pallax/kernels`), named by a hash of the source, the compiler and its flags,
the jaxlib version and the host CPU's model and feature flags (the code is built with
`-march=native`). A process compiles at most once; concurrent processes each write a
temporary file and rename it into place. Without a working compiler `ensure_registered`
logs one warning and returns False, and callers keep the XLA path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jaxlib.version

log = logging.getLogger("pallax.cpu_kernels")

HERE = pathlib.Path(__file__).parent
SOURCES = (HERE / "qmatmul.cc", HERE / "bf16_matmul.cc", HERE / "attention.cc",
           HERE / "kivi_attention.cc", HERE / "prefill_attention.cc")  # one library  # fmt: skip
HEADERS = (HERE / "parallel.h", HERE / "bf16.h", HERE / "qmatmul_common.h", HERE / "qmatmul_avx2.h")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17")
# FFI target name -> exported handler symbol in SOURCES.
TARGETS = {
    "pallax_qmatmul": "PallaxQMatmul",
    "pallax_qmatmul_offset": "PallaxQMatmulOffset",
    "pallax_qmatmul_multi": "PallaxQMatmulMulti",
    "pallax_bf16_matmul": "PallaxBf16Matmul",
    "pallax_f32_matmul": "PallaxF32Matmul",
    "pallax_float_matmul_multi": "PallaxFloatMatmulMulti",
    "pallax_decode_attention": "PallaxDecodeAttention",
    "pallax_decode_attention_int8": "PallaxDecodeAttentionInt8",
    "pallax_paged_decode_attention": "PallaxPagedDecodeAttention",
    "pallax_paged_decode_attention_int8": "PallaxPagedDecodeAttentionInt8",
    "pallax_kivi_attention": "PallaxKiviAttention",
    "pallax_prefill_attention": "PallaxPrefillAttention",
}
COMPILE_TIMEOUT_S = 300

_lock = threading.Lock()
_registered: bool | None = None
_libraries: list[ctypes.CDLL] = []  # kept alive: XLA holds pointers into them


def cache_dir() -> pathlib.Path:
    root = os.environ.get("PALLAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pallax"
    )
    return pathlib.Path(root) / "kernels"


def _cpu_fingerprint() -> str:
    """The host's CPU model and feature flags: a library built with -march=native is
    reused only on a CPU that has the same ones."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = {ln for ln in f if ln.startswith(("flags", "model name"))}
        return "".join(sorted(lines))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise OSError(f"{cxx} --version failed: {out.stderr.strip()}")
    return out.stdout.splitlines()[0] if out.stdout else ""


def compile_library(
    cxx: str | None = None, cache: pathlib.Path | None = None, flags: tuple[str, ...] = FLAGS
) -> pathlib.Path:
    """The compiled library's path, building it when the cache does not hold it yet.

    `cxx` defaults to `$CXX`, else g++. Raises OSError when the compiler is missing or
    fails; `ensure_registered` turns that into a warning.
    """
    cxx = cxx or os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise OSError(f"C++ compiler {cxx!r} not found")
    key = hashlib.sha256()
    for src in (*SOURCES, *HEADERS):
        key.update(src.read_bytes() + b"\0")
    for part in (" ".join(flags), _compiler_version(cxx), jaxlib.version.__version__):
        key.update(b"\0" + part.encode())
    key.update(b"\0" + _cpu_fingerprint().encode())
    cache = cache or cache_dir()
    target = cache / f"qmatmul-{key.hexdigest()[:24]}.so"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        cmd = [cxx, *flags, "-isystem", jax.ffi.include_dir(), *map(str, SOURCES), "-o", tmp]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if out.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def register(path: pathlib.Path, suffix: str = "") -> None:
    """Load a compiled library and register its handlers as the CPU FFI targets
    `TARGETS` (each name + `suffix`)."""
    lib = ctypes.CDLL(str(path))
    for name, symbol in TARGETS.items():
        capsule = jax.ffi.pycapsule(getattr(lib, symbol))
        jax.ffi.register_ffi_target(name + suffix, capsule, platform="cpu")
    _libraries.append(lib)


def ensure_registered() -> bool:
    """Build (once per process), load and register the FFI targets; False on failure."""
    global _registered
    if _registered is not None:
        return _registered
    with _lock:
        if _registered is None:
            try:
                register(compile_library())
                _registered = True
            except (OSError, subprocess.SubprocessError, AttributeError) as e:
                log.warning("pallax CPU kernels unavailable, using XLA instead: %s", e)
                _registered = False
        return _registered
