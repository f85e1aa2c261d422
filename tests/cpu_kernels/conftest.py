"""The FFI kernel's fixture: the tests that need it skip without a C++ compiler."""

from __future__ import annotations

import os

import pytest

from pallax import cpu_kernels


@pytest.fixture
def kernel():
    """Skips when the kernel cannot be built here (compiled on first use, not at import);
    under CI, where the machine has g++, an unavailable kernel is a failure instead."""
    if not cpu_kernels.available():
        if os.environ.get("CI"):
            pytest.fail("CPU kernels unavailable under CI: see the pallax.cpu_kernels warning")
        pytest.skip("CPU kernels unavailable (no C++ compiler?)")
