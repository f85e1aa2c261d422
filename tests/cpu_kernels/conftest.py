"""The FFI kernels' fixture: the tests that need them fail when the kernels cannot run."""

from __future__ import annotations

import pytest

from pallax import cpu_kernels


@pytest.fixture
def kernel():
    """The kernels are built with g++ on first use (not at import). g++ is part of the
    test environment (CI's image has it), so an unavailable kernel fails, never skips."""
    if not cpu_kernels.available():
        pytest.fail(
            "CPU kernels unavailable: see the pallax.cpu_kernels warning (needs g++, and "
            "PALLAX_CPU_KERNELS must not be 0 while these tests run)"
        )
