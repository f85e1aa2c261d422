"""pallax keeps XLA:CPU's generated code to AVX (pallax/__init__.py): without FMA
instructions no multiply is contracted into an add, so an elementwise op rounds the same
whatever XLA fuses around it (one device or a mesh, one row or eight)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

import pallax

X86 = platform.machine().lower() in ("x86_64", "amd64")

# Gemma's residual stream, `x + rms_norm(y)`, in one program and as the norm alone with
# the add done by numpy: the count of elements that differ, for one row and for eight.
CHECK = """
import numpy as np
import pallax
import jax, jax.numpy as jnp
from pallax.ir import primitives as ops
rng = np.random.default_rng(0)
w = jnp.asarray(1 + rng.standard_normal(640) * 0.1, jnp.float32)
fused = jax.jit(lambda x, y, w: x + ops.rms_norm(y, w, eps=1e-6))
alone = jax.jit(lambda y, w: ops.rms_norm(y, w, eps=1e-6))
for rows in (1, 8):
    x = jnp.asarray(rng.standard_normal((rows, 1, 640)) * 10, jnp.float32)
    y = jnp.asarray(rng.standard_normal((rows, 1, 640)), jnp.float32)
    want = np.asarray(x) + np.asarray(alone(y, w))
    print(int((np.asarray(fused(x, y, w)) != want).sum()))
"""


def _env(**extra) -> dict:
    """This process's environment without a user's PALLAX_XLA_FMA, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k != pallax.FMA_SWITCH}, **extra}


def _differing(**env) -> list[int]:
    full = _env(XLA_FLAGS="", **env)
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         env=full, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(v) for v in out.stdout.split()]


@pytest.mark.skipif(not X86, reason="the flag is set on x86-64 only")
def test_the_flag_is_set_unless_the_user_sets_one():
    assert "--xla_cpu_max_isa=AVX" in os.environ["XLA_FLAGS"].split()
    code = "import os, pallax; print(os.environ.get('XLA_FLAGS', ''))"
    for flags, added in (("", 1), ("--xla_cpu_max_isa=AVX512", 0)):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=_env(XLA_FLAGS=flags), timeout=120)  # fmt: skip
        got = out.stdout.split()
        assert got.count("--xla_cpu_max_isa=AVX") == added, (flags, got)


@pytest.mark.skipif(not X86, reason="the flag is set on x86-64 only")
def test_a_norm_rounds_the_same_whatever_it_is_fused_with():
    """After: no element differs. Before (PALLAX_XLA_FMA=1, XLA's default), on a CPU with
    FMA the norm's multiply is contracted into the add in the fused program only."""
    assert _differing() == [0, 0]
    if "fma" in open("/proc/cpuinfo").read().split():
        before = _differing(**{pallax.FMA_SWITCH: "1"})
        assert min(before) > 0, before
