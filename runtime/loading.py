"""`pallax.load`: a model from a name or a path, whatever its format.

GGUF files and Hugging Face directories are read by `pallax.model`; pallax checkpoints
(weights after a pass pipeline, and the passes) by `pallax.runtime.checkpoint`, which
rebuilds the passes, so this dispatcher lives in the runtime, above both.
"""

from __future__ import annotations

import os
import pathlib

from pallax import atomic_dir
from pallax.model.configs import KNOWN_MODELS, KNOWN_SHAPES
from pallax.model.loaded import Model, load_gguf


def load(
    name_or_path: str | os.PathLike = "smollm2-135m",
    *,
    keep_quantized: bool = False,
    abstract: bool = False,
    lazy: bool = False,
) -> Model:
    """Load a model by name (see `pallax.model.configs.KNOWN_MODELS`) or from a path:
    a .gguf file, a Hugging Face checkpoint directory (config.json + *.safetensors)
    or a pallax checkpoint written by `CompiledModel.save`.

    keep_quantized=True (GGUF only): the file's quantized tensors (Q8_0, Q4_0, Q4_1,
    Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) load straight into pallax's int8 / int4 group
    formats, without a float round trip, and run at those bits.

    abstract=True (or a name in `pallax.model.configs.KNOWN_SHAPES`, such as
    "llama-3-70b", or a path to an HF config.json): the config alone, with abstract
    weights (jax.ShapeDtypeStruct) to compile, shard onto any mesh, size with
    `memory_report()` and lower for tpu / cuda (`CompiledModel.lower`) without the
    weights; it cannot generate.

    lazy=True (GGUF files, HF safetensors and pallax checkpoints): weights are read from
    the file only where they are placed. With the shard pass (after casts, if any) each device
    reads only its slice, and each process only its devices' slices; any other pipeline
    reads them whole at compile time (`pallax.ir.lazy`).
    """
    from pallax.model import sources

    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"model must be a model name or a path, got {name_or_path!r}")
    for flag, value in (("keep_quantized", keep_quantized), ("abstract", abstract),
                        ("lazy", lazy)):  # fmt: skip
        if not isinstance(value, bool):
            raise ValueError(f"{flag}={value!r} must be True or False")
    shape = KNOWN_SHAPES.get(str(name_or_path).lower())
    if lazy and (shape is not None or str(name_or_path).endswith(".json")):
        raise ValueError(
            f"lazy=True reads weights from a file; {str(name_or_path)!r} is a config alone "
            "(abstract weights)"
        )
    if lazy and (keep_quantized or abstract):
        raise ValueError(
            f"lazy=True reads float weights where they are placed; it does not combine with "
            f"{'keep_quantized' if keep_quantized else 'abstract'}=True"
        )
    if shape is not None or str(name_or_path).endswith(".json") or abstract:
        from pallax.model import abstract as abstract_models

        if keep_quantized:
            raise ValueError(
                "keep_quantized=True reads a GGUF's blocks; an abstract model has none"
            )
        if shape is not None:
            return abstract_models.abstract_model(shape, str(name_or_path))
        return abstract_models.abstract_from_path(sources.resolve(name_or_path))
    candidate = pathlib.Path(name_or_path).expanduser()
    if not candidate.exists() and candidate.parent.is_dir():
        atomic_dir.recover(candidate)  # a save killed mid-replace: put the old checkpoint back
    path = pathlib.Path(sources.resolve(name_or_path))
    if path.is_dir() and keep_quantized:
        raise ValueError(
            f"keep_quantized=True applies to GGUF files; {str(path)!r} is a directory "
            "(quantize its weights with pallax.passes.quantize_weights instead)"
        )
    if path.is_dir():
        from pallax.model import hf_checkpoint
        from pallax.runtime import checkpoint

        if checkpoint.is_checkpoint(path):
            return checkpoint.load_checkpoint(path, lazy=lazy)
        if (path / "config.json").is_file():
            return hf_checkpoint.load_hf_directory(path, lazy=lazy)
        raise ValueError(
            f"directory {str(path)!r} has no config.json (a Hugging Face checkpoint) and no "
            f"{checkpoint.MANIFEST} (a pallax checkpoint); pallax loads those, .gguf files "
            f"and the known models {sorted(KNOWN_MODELS)}"
        )
    return load_gguf(path, keep_quantized=keep_quantized, lazy=lazy)
