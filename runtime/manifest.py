"""What checkpoints and artifacts both do with their manifests: a sha256 per file, the
manifest's own digest, and the files under a directory that the manifest does not list."""

from __future__ import annotations

import hashlib
import json
import pathlib

DIGEST_KEY = "manifest_sha256"


def sha256(file: pathlib.Path) -> str:
    with file.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest(manifest: dict) -> str:
    """sha256 of everything in the manifest but the digest itself (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def file_digests(root: pathlib.Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root`, in sorted order."""
    return {
        f.relative_to(root).as_posix(): sha256(f) for f in sorted(root.rglob("*")) if f.is_file()
    }


def unlisted(root: pathlib.Path, files: dict, manifest_name: str) -> list[str]:
    """Files under `root` (other than the manifest) that `files` does not list, sorted."""
    present = {f.relative_to(root).as_posix() for f in root.rglob("*") if not f.is_dir()}
    return sorted(present - {manifest_name} - set(files))
