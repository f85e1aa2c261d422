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
import os
import platform

__version__ = "0.1.0"
FMA_SWITCH = "PALLAX_XLA_FMA"


def _no_fma_contraction() -> None:
    """Keep XLA:CPU's generated code to AVX (no FMA instructions), unless XLA_FLAGS sets
    `--xla_cpu_max_isa` or PALLAX_XLA_FMA=1.

    XLA:CPU compiles with floating-point contraction always allowed: where the target has
    FMA, `a * b + c` becomes one FMA or stays a multiply and an add depending on how the
    ops around it are fused, and that fusion differs between one device and a mesh, one
    row and eight. A norm's last multiply contracted into the residual add in one program
    and not in another was the last-bit difference that gave Gemma 3 int8 other greedy
    tokens on a mesh (docs/SHARDING.md). Without FMA in XLA's code every elementwise op
    rounds as written, whatever the fusion. pallax's C++ kernels keep their own
    instructions (AVX2, FMA, VNNI where present): they are not XLA's code. Read by XLA
    when its CPU backend starts: setting it later (after a first jax computation) has no
    effect, and the program keeps XLA's default."""
    if os.environ.get(FMA_SWITCH, "").strip().lower() in ("1", "true", "on", "yes"):
        return
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_max_isa" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_max_isa=AVX".strip()


_no_fma_contraction()

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
