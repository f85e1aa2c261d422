"""pallax: a compiler-style LLM inference stack in JAX.

import pallax
model = pallax.load("smollm2-135m")
compiled = pallax.compile(model, passes=[pallax.passes.cast("bfloat16")])
outs = compiled.generate(["The capital of France is"], max_new_tokens=32)
"""

from __future__ import annotations

from pallax import cpu_kernels as _cpu_kernels  # registers the CPU qlinear kernel
from pallax import pallas_kernels as _kernels  # registers the tpu / cuda lowerings
from pallax import passes
from pallax.model.configs import DEFAULT_MODEL, KNOWN_MODELS
from pallax.model.loaded import Model, load
from pallax.runtime.compiled import CompiledModel, compile
from pallax.runtime.requests import GenerationResult
from pallax.runtime.sampling import SamplingParams

__version__ = "0.1.0"
del _cpu_kernels, _kernels

__all__ = [
    "DEFAULT_MODEL", "KNOWN_MODELS", "CompiledModel", "GenerationResult", "Model", "SamplingParams",
    "compile", "load", "passes",
]  # fmt: skip
