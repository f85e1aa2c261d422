"""pallax: a compiler-style LLM inference stack in JAX.

import pallax
model = pallax.load("smollm2-135m")
compiled = pallax.compile(model, passes=[pallax.passes.cast("bfloat16")])
outs = compiled.generate(["The capital of France is"], max_new_tokens=32)

The names below are imported on first use: `import pallax` loads neither jax nor the
model code, so the command line starts at once and handles Ctrl-C from its first moment.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "DEFAULT_MODEL": "pallax.model.configs",
    "KNOWN_MODELS": "pallax.model.configs",
    "Model": "pallax.model.loaded",
    "load": "pallax.runtime.loading",
    "CompiledModel": "pallax.runtime.compiled",
    "compile": "pallax.runtime.compiled",
    "GenerationResult": "pallax.runtime.requests",
    "SamplingParams": "pallax.runtime.sampling",
    "Artifact": "pallax.runtime.artifact",
    "ArtifactError": "pallax.runtime.artifact",
    "load_artifact": "pallax.runtime.artifact",
    "Engine": "pallax.runtime.engine",
    "RequestHandle": "pallax.runtime.engine_handle",
}

__all__ = [*sorted(_LAZY), "passes"]


def __getattr__(name: str):
    if name == "passes":
        return importlib.import_module("pallax.passes")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pallax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
