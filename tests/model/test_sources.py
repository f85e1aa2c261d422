"""Named models: chunks concatenated in order and verified by SHA-256 before use."""

from __future__ import annotations

import hashlib

import pytest

from pallax.model import sources
from pallax.model.configs import KNOWN_MODELS, ModelSource, WheelFile


def _source(tmp_path, chunks, digest=None):
    files = []
    for i, data in enumerate(chunks):
        f = tmp_path / f"chunk{i}"
        f.write_bytes(data)
        files.append(f)
    parts = tuple(WheelFile(f"pkg-part{i}", "1.0", f"pkg_part{i}/data/x.part{i}") for i in range(3))
    digest = digest or hashlib.sha256(b"".join(chunks)).hexdigest()
    src = ModelSource(name="tiny-model", filename="tiny.gguf", parts=parts, sha256=digest)
    by_path = {p.path: f for p, f in zip(parts, files, strict=True)}
    return src, lambda part: by_path[part.path]


def test_chunks_concatenate_in_order(tmp_path, monkeypatch):
    src, installed = _source(tmp_path, [b"GGUF", b"-middle-", b"end"])
    monkeypatch.setattr(sources, "_installed_file", installed)
    monkeypatch.setenv("PALLAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(KNOWN_MODELS, "tiny-model", src)
    path = sources.resolve("tiny-model")
    assert path.read_bytes() == b"GGUF-middle-end"
    assert path.with_suffix(".sha256").read_text() == src.sha256
    assert sources.resolve("TINY-MODEL") == path  # cached, names are case-insensitive


def test_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    src, installed = _source(tmp_path, [b"a", b"b", b"c"], digest="0" * 64)
    monkeypatch.setattr(sources, "_installed_file", installed)
    monkeypatch.setenv("PALLAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(KNOWN_MODELS, "tiny-model", src)
    with pytest.raises(RuntimeError, match="checksum mismatch for tiny.gguf"):
        sources.resolve("tiny-model")
    assert not list((tmp_path / "cache" / "tiny-model").iterdir())


def test_processes_fetching_at_once_each_write_their_own_file(tmp_path, monkeypatch):
    """Two test workers (or the processes of a multi-process run on one host) resolving a
    model at once: each assembles its own temporary file, and the one put in place last
    is whole (a shared `.part` name interleaved their writes)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    chunks = [os.urandom(4 << 20) for _ in range(3)]
    src, installed = _source(tmp_path, chunks)
    monkeypatch.setattr(sources, "_installed_file", installed)
    monkeypatch.setenv("PALLAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(KNOWN_MODELS, "tiny-model", src)
    target = tmp_path / "cache" / "tiny-model" / "tiny.gguf"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: sources._download(src, target), range(8)))
    assert target.read_bytes() == b"".join(chunks)
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny.gguf"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


def test_gemma3_is_a_known_model():
    assert KNOWN_MODELS["gemma3-270m"].filename == "gemma-3-270m-q4_k_m.gguf"
    assert len(KNOWN_MODELS["gemma3-270m"].parts) == 4
