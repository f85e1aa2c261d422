"""The platforms that have Pallas kernels, and how a kernel wrapper picks one."""

from __future__ import annotations

import jax

PLATFORMS = ("tpu", "cuda")


def resolve_platform(platform: str | None, interpret: bool) -> str:
    """``platform`` or, when None, the default backend's (interpret mode on CPU: "tpu")."""
    if platform is None:
        backend = jax.default_backend()
        platform = "cuda" if backend in ("gpu", "cuda") else backend
        if platform == "cpu" and interpret:
            platform = "tpu"
    if platform not in PLATFORMS:
        raise ValueError(
            f"{platform=} has no Pallas kernel; expected one of {PLATFORMS} (on CPU use the"
            " reference, or interpret=True)"
        )
    return platform
