"""Ahead-of-time artifacts: exported, loaded in a fresh process that cannot import the model
code or the passes, generating what the compiled model generates; refused cleanly when
damaged or made for another machine."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pallax
from pallax.runtime import artifact

SMALL = dict(cache_sizes=(256,), prefill_sizes=(16, 64), score_chunk=16, xla_cache=False)
PROMPTS = ["The capital of France is", "def fib(n):"]

# Runs in a fresh process: importing pallax.model or pallax.passes raises.
FRESH = textwrap.dedent(
    """
    import json, sys

    class Forbid:
        def find_spec(self, name, path=None, target=None):
            if name.startswith(("pallax.model", "pallax.passes")):
                raise ImportError(f"the artifact path imported {name}")

    sys.meta_path.insert(0, Forbid())
    import pallax

    out = {}
    for path in sys.argv[2:]:
        art = pallax.load_artifact(path)
        res = art.generate(json.loads(sys.argv[1]), max_new_tokens=12, ignore_eos=True)
        streamed = "".join(art.stream(json.loads(sys.argv[1])[0], max_new_tokens=12,
                                      ignore_eos=True))
        score = art.score("The capital of France is Paris.").tolist() if "fp32" in path else None
        out[path] = {"texts": [r.text for r in res], "stream": streamed, "score": score,
                     "xla_cache": art.xla_cache, "hits": art.xla_cache_hits}
    print(json.dumps(out))
    """
)


def _fresh(paths):
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps(PROMPTS), *map(str, paths)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fp32_artifact(compiled_fp32, tmp_path_factory):
    path = tmp_path_factory.mktemp("art") / "fp32"
    compiled_fp32.export(path, batch_sizes=(1, 2), **{**SMALL, "xla_cache": True})
    return path


def _expected(compiled, score=False):
    res = compiled.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    return [r.text for r in res], compiled.score(
        "The capital of France is Paris."
    ) if score else None


@pytest.mark.slow
def test_fresh_process_generates_what_the_compiled_model_does(
    fp32_artifact, compiled_fp32, smollm2_gguf_path, tmp_path
):
    """fp32 and the GGUF's own blocks: greedy text equal, in a process that never imports
    pallax.model or the passes. fp32 runs the executables compiled at export (its C++
    kernels included), the GGUF blocks compile their modules in the fresh process. (A
    compressed cache runs from an artifact in tests/sharding/test_shard.py's sharded
    artifact, in one process and in two, and int8 weights in test_artifact_engine.py;
    int8, int4 and KIVI-2 here took ~170 s of a slow VM's suite.)"""
    configs = {
        "gguf": pallax.compile(pallax.load(smollm2_gguf_path, keep_quantized=True), []),
    }
    paths = {"fp32": fp32_artifact}
    expected = {"fp32": _expected(compiled_fp32, score=True)}  # scoring: one config is enough
    for name, compiled in configs.items():
        paths[name] = tmp_path / name
        compiled.export(paths[name], batch_sizes=(2,), **SMALL)  # no executables
        expected[name] = _expected(compiled)
    got = _fresh(paths.values())
    for name, path in paths.items():
        texts, score = expected[name]
        assert got[str(path)]["texts"] == texts, name
        assert got[str(path)]["stream"] == texts[0], name
        if score is not None:
            np.testing.assert_allclose(got[str(path)]["score"], score, atol=1e-4, err_msg=name)
        if name == "fp32":
            assert got[str(path)]["xla_cache"] == "used", name
            assert "decode-b2-s256" in got[str(path)]["hits"], name
        else:
            assert got[str(path)]["xla_cache"].startswith("absent"), name
            assert got[str(path)]["hits"] == [], name


def test_manifest_and_files(fp32_artifact, compiled_fp32):
    manifest = json.loads((fp32_artifact / artifact.MANIFEST).read_text())
    assert manifest["format_version"] == 1 and manifest["mesh"] is None  # 2: sharded ones
    assert manifest["platforms"] == ["cpu"]
    assert manifest["buckets"] == {
        "batch_sizes": [1, 2], "prefill_sizes": [16, 64], "cache_sizes": [256], "score_chunk": 16,
    }  # fmt: skip
    assert manifest["config"] == compiled_fp32.config.to_dict()
    assert set(manifest["versions"]) == {"pallax", "jax", "jaxlib"}
    assert manifest["lowering"]["jax_export_ignore_forward_compatibility"] is False
    assert set(manifest["xla_cache"]["key"]) >= {"platform", "jax", "jaxlib", "host", "devices"}
    modules = sorted(n for n in manifest["files"] if n.startswith("modules/"))
    assert modules == [
        "modules/decode-b1-s256.jax", "modules/decode-b2-s256.jax",
        "modules/prefill-b1-t16-s256.jax", "modules/prefill-b1-t64-s256.jax",
        "modules/prefill-b2-t16-s256.jax", "modules/prefill-b2-t64-s256.jax",
        "modules/score-t16-s256.jax",
    ]  # fmt: skip
    assert "tokenizer/tokenizer.json" in manifest["files"]
    executables = sorted(n for n in manifest["files"] if n.startswith("xla/"))
    assert executables == [m.replace("modules/", "xla/").replace(".jax", ".bin") for m in modules]


def test_xla_cache_is_used_only_where_it_matches(fp32_artifact, compiled_fp32, tmp_path):
    """The executables compiled at export run where the machine is the same; another jax or
    CPU compiles the modules instead, and an executable that fails to load is a warning and
    a compile, never a wrong answer."""
    want = [r.text for r in compiled_fp32.generate(PROMPTS[:1], max_new_tokens=6,
                                                    ignore_eos=True)]  # fmt: skip

    def run(path):
        art = pallax.load_artifact(path)
        got = [r.text for r in art.generate(PROMPTS[:1], max_new_tokens=6, ignore_eos=True)]
        assert got == want, art.xla_cache
        return art

    art = run(fp32_artifact)
    assert art.xla_cache == "used"
    assert art.xla_cache_hits == ["prefill-b1-t16-s256", "decode-b1-s256"]

    def key(**change):
        return lambda m: m["xla_cache"]["key"].update(change)

    other_jax = _copy(fp32_artifact, tmp_path / "jax")
    _resign(other_jax, key(jax="0.0.1"))
    art = run(other_jax)
    assert re.fullmatch(r"not used: jax differs \(exported with '0\.0\.1', here '.+'\)",
                        art.xla_cache), art.xla_cache  # fmt: skip
    assert art.xla_cache_hits == []
    other_cpu = _copy(fp32_artifact, tmp_path / "cpu")
    _resign(other_cpu, key(host="0" * 64))
    art = run(other_cpu)
    assert art.xla_cache == "not used: the CPU model or feature flags differ"
    assert art.xla_cache_hits == []
    unknown_cpu = _copy(fp32_artifact, tmp_path / "unknown")
    _resign(unknown_cpu, key(host=None))  # exported where /proc/cpuinfo said nothing
    art = run(unknown_cpu)
    assert art.xla_cache.startswith("not used: the CPU's features are unknown"), art.xla_cache

    broken = _copy(fp32_artifact, tmp_path / "broken")
    f = broken / "xla" / "decode-b1-s256.bin"
    f.write_bytes(b"not an executable")
    _resign(broken, lambda m: m["files"].update({"xla/decode-b1-s256.bin": artifact._sha256(f)}))
    with pytest.warns(UserWarning, match=r"xla/decode-b1-s256.bin could not be loaded .*"
                      "compiling the module instead"):  # fmt: skip
        art = run(broken)
    assert art.xla_cache_hits == ["prefill-b1-t16-s256"]


def test_in_process_load_matches_and_refuses_what_it_was_not_exported_for(
    fp32_artifact, compiled_fp32
):
    art = pallax.load_artifact(fp32_artifact)
    want = compiled_fp32.generate(PROMPTS[:1], max_new_tokens=6, ignore_eos=True)[0]
    assert art.generate(PROMPTS[:1], max_new_tokens=6, ignore_eos=True)[0] == want
    with pytest.raises(ValueError, match=r"3 prompts: this artifact was exported for batch "
                       r"sizes \(1, 2\)"):  # fmt: skip
        art.generate(["a", "b", "c"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"need a cache of 300; .* cache sizes \(256,\)"):
        art.generate(["hello"], max_new_tokens=299)
    with pytest.raises(ValueError, match="stop token ids; this artifact's decode loop takes 16"):
        art.generate(["hello"], max_new_tokens=2, stop_token_ids=list(range(100, 120)))
    with pytest.raises(ValueError, match="scores up to 256 tokens"):
        art.score("word " * 300)
    with pytest.raises(TypeError, match=r"prompt 0 element 0 is 1.5"):
        art.generate([[1.5]])
    with pytest.raises(ValueError, match=r"has no engine modules: export it with engine="):
        pallax.Engine(art)


def test_kernels_in_the_modules(compiled_fp32, smollm2, tmp_path):
    """Non-portable CPU modules call pallax's C++ kernels; portable ones do not; an artifact
    for cpu, cuda and tpu carries the Pallas kernels of both accelerators."""
    from jax import export

    def text(path, name):
        data = (path / "modules" / f"{name}.jax").read_bytes()
        return export.deserialize(bytearray(data)).mlir_module()

    int8 = pallax.compile(smollm2, ["int8"])
    multi, portable = tmp_path / "multi", tmp_path / "portable"
    int8.export(multi, platforms=("cpu", "cuda", "tpu"), **SMALL)  # SMALL: no xla_cache
    int8.export(portable, portable=True, **SMALL)

    def targets(module_text):
        found = re.findall(r'(?:custom_call @|call_target_name = ")([\w$.]+)', module_text)
        return {t: found.count(t) for t in set(found)}

    decode = targets(text(multi, "decode-b1-s256"))
    assert decode.get("pallax_qmatmul", 0) > 0 and decode.get("pallax_decode_attention", 0) > 0
    assert decode.get("tpu_custom_call", 0) > 0  # Mosaic TPU
    assert any(t.startswith(("mosaic_gpu", "__gpu$xla.gpu.triton")) for t in decode), decode
    assert not any(t.startswith("pallax_") for t in targets(text(portable, "decode-b1-s256")))
    manifest = json.loads((portable / artifact.MANIFEST).read_text())
    assert manifest["cpu_kernel_targets"] == [] and manifest["portable"] is True

    # The kernels by name, as a loader that cannot compile a module reports them.
    from pallax.runtime.artifact_compile import kernels_in

    named = kernels_in(text(multi, "decode-b1-s256"))
    assert "rms_norm" in named["tpu_custom_call"], named
    assert "qmatmul" in named["__gpu$xla.gpu.triton"], named
    assert any("rms_norm" in named[t] for t in named if t.startswith("mosaic_gpu")), named
    assert named["pallax_qmatmul"] == ["pallax_qmatmul"], named
    # What a tpu or cuda loader says when XLA refuses the module (this machine has neither).
    from pallax.runtime.artifact_compile import compile_failure

    module = text(multi, "decode-b1-s256")
    refused = RuntimeError("Mosaic failed to compile rms_norm: bad layout")
    said = compile_failure("modules/decode-b1-s256.jax", "tpu", module, refused)
    assert said.startswith("cannot compile modules/decode-b1-s256.jax for tpu: its kernel "
                           "rms_norm failed. The compiler said: Mosaic failed"), said  # fmt: skip
    assert "jax-ml/jax#34936" in said
    said = compile_failure("modules/decode-b1-s256.jax", "cuda", module,
                           RuntimeError("INTERNAL: ptxas exited with 1"))  # fmt: skip
    assert "its kernels are __gpu$xla.gpu.triton: " in said and "qmatmul" in said, said
    assert "tpu_custom_call" not in said and "pallax_qmatmul" not in said, said


# Runs in a fresh process whose C++ kernels claim to be registered but are not: XLA cannot
# compile a module that calls them, the way an accelerator refuses a kernel it cannot build.
UNREGISTERED = textwrap.dedent(
    """
    import sys
    import pallax
    from pallax.cpu_kernels import build

    build.ensure_registered = lambda: True
    art = pallax.load_artifact(sys.argv[1])
    try:
        art.generate(["hello"], max_new_tokens=2)
    except pallax.ArtifactError as e:
        print("ERROR", e)
    """
)


@pytest.mark.slow
def test_a_module_that_does_not_compile_is_reported_with_its_kernels(smollm2, tmp_path):
    path = tmp_path / "int8"
    pallax.compile(smollm2, ["int8"]).export(path, **SMALL)
    proc = subprocess.run([sys.executable, "-c", UNREGISTERED, str(path)], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    error = proc.stdout.split("ERROR ", 1)[-1]
    assert error.startswith(
        f"pallax artifact {str(path)!r}: cannot compile "
        "modules/prefill-b1-t16-s256.jax for cpu: its kernel"
    ), error
    assert "pallax_qmatmul" in error and "portable=True" in error, error


# Runs in a process with jax's persistent compilation cache on: the second export's
# compiles are cache hits, whose executables serialized without their code.
JAX_CACHE = textwrap.dedent(
    """
    import json, sys
    import pallax

    gguf, root = sys.argv[1:3]
    compiled = pallax.compile(pallax.load(gguf), ["int8"])
    sizes = dict(batch_sizes=(1,), cache_sizes=(64,), prefill_sizes=(16,), score_chunk=16)
    for name in ("first", "second"):
        compiled.export(f"{root}/{name}", **sizes)
    want = [o.text for o in compiled.generate(["Hello there"], max_new_tokens=6)]
    art = pallax.load_artifact(f"{root}/second")
    got = [o.text for o in art.generate(["Hello there"], max_new_tokens=6)]
    print(json.dumps({"want": want, "got": got, "hits": art.xla_cache_hits}))
    """
)


def test_export_with_jax_compilation_cache_on(smollm2_gguf_path, tmp_path):
    """An export in a process that uses jax's persistent compilation cache keeps
    executables that run (before: the cache's executables, re-serialized, failed with
    "Function ... not found" in the artifact's first call)."""
    import os

    from tests.model.test_synthetic_gguf import write_tiny

    gguf = write_tiny(tmp_path / "tiny.gguf", smollm2_gguf_path)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", JAX_CACHE, str(gguf), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["hits"] == ["prefill-b1-t16-s64", "decode-b1-s64"], out
    assert out["got"] == out["want"], out
    assert any((tmp_path / "jax-cache").iterdir())  # the cache was on


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _resign(path, edit):
    file = path / artifact.MANIFEST
    m = json.loads(file.read_text())
    edit(m)
    m["manifest_sha256"] = artifact._digest(m)
    file.write_text(json.dumps(m))


def _biggest(path, sub):
    return max((f for f in (path / sub).rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


@pytest.mark.parametrize(
    "damage, match",
    [
        ("truncate weights", r"the file weights/.* is corrupted"),
        ("flip a byte", r"the file modules/decode-b1-s256.jax is corrupted"),
        ("missing module", r"the file modules/decode-b1-s256.jax is missing"),
        ("unlisted file", r"files not listed in manifest.json: \['modules/extra.jax'\]"),
        ("edited manifest", "was changed after it was written"),
        ("newer format", r"format_version 3 was written by a newer pallax"),
        ("other platform", r"exported for tpu; this machine runs cpu"),
        ("bad module", r"cannot read module modules/decode-b1-s256.jax \(exported with jax"),
    ],
)
def test_bad_artifacts_are_refused_naming_the_file(fp32_artifact, tmp_path, damage, match):
    path = _copy(fp32_artifact, tmp_path / "art")
    if damage == "truncate weights":
        f = _biggest(path, "weights")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "flip a byte":
        f = path / "modules" / "decode-b1-s256.jax"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 1
        f.write_bytes(data)
    elif damage == "missing module":
        (path / "modules" / "decode-b1-s256.jax").unlink()
    elif damage == "unlisted file":
        (path / "modules" / "extra.jax").write_bytes(b"x")
    elif damage == "edited manifest":
        file = path / artifact.MANIFEST
        m = json.loads(file.read_text())
        m["config"]["rope_theta"] *= 1000
        file.write_text(json.dumps(m))
    elif damage == "newer format":
        _resign(path, lambda m: m.update(format_version=artifact.FORMAT_VERSION + 1))
    elif damage == "other platform":
        _resign(path, lambda m: m.update(platforms=["tpu"]))
    else:  # a module that fails to deserialize, its checksum updated to match
        f = path / "modules" / "decode-b1-s256.jax"
        f.write_bytes(b"not a module")
        _resign(path, lambda m: m["files"].update({"modules/decode-b1-s256.jax":
                                                   artifact._sha256(f)}))  # fmt: skip
    with pytest.raises(ValueError, match=match) as info:
        art = pallax.load_artifact(path)
        art.generate(["hi"], max_new_tokens=2)  # a bad module that loads lazily
    assert str(path) in str(info.value)


def test_a_jax_outside_the_modules_compatibility_window_is_refused(fp32_artifact, monkeypatch):
    """Before any weight reaches a device: a module whose calling convention this jax does
    not run (simulated by narrowing this jax's window past the module's version)."""
    from jax import export

    version = export.maximum_supported_calling_convention_version
    monkeypatch.setattr(export, "minimum_supported_calling_convention_version", version + 1)
    monkeypatch.setattr(export, "maximum_supported_calling_convention_version", version + 2)
    restored = []
    monkeypatch.setattr(artifact.Artifact, "_restore_weights", lambda self, a: restored.append(1))
    with pytest.raises(artifact.ArtifactError, match=rf"uses jax.export calling convention "
                       rf"{version}; this jax .* runs {version + 1} to {version + 2}"):  # fmt: skip
        pallax.load_artifact(fp32_artifact)
    assert restored == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(platforms=("gpu",)), r"platforms=\('gpu',\): each one of \('cpu', 'cuda', 'tpu'\)"),
        (dict(platforms=()), "must be a non-empty list"),
        (dict(batch_sizes=(0,)), "batch_sizes: 0 must be an integer >= 1"),
        (dict(batch_sizes=(True,)), "batch_sizes: True must be an integer"),
        (dict(cache_sizes=(10**6,)), "cache_sizes: 1000000 is larger than 8192"),
        (dict(prefill_sizes=(512,), cache_sizes=(256,)), "all longer than the largest cache 256"),
        (dict(portable="yes"), "portable='yes' must be a boolean"),
        (dict(xla_cache=1), "xla_cache=1 must be a boolean"),
        (dict(engine={"slots": 2}), r"engine= has unknown keys \['slots'\]; allowed: max_batch"),
        (dict(engine={"max_batch": 0}), "max_batch=0 must be an integer >= 1"),
        (dict(engine={"max_len": 10**6}), "max_len=1000000 is longer than the context length"),
        (dict(engine=[2]), r"engine=\[2\] must be a dict of max_batch"),
    ],
)
def test_bad_export_arguments_fail_before_tracing(compiled_fp32, tmp_path, kwargs, match):
    n = len(compiled_fp32._fns)
    with pytest.raises(ValueError, match=match):
        compiled_fp32.export(tmp_path / "x", **kwargs)
    assert len(compiled_fp32._fns) == n and not (tmp_path / "x").exists()


def test_export_never_replaces_without_overwrite(fp32_artifact, compiled_fp32, tmp_path):
    path = _copy(fp32_artifact, tmp_path / "art")
    with pytest.raises(ValueError, match="already holds a pallax artifact; pass overwrite=True"):
        compiled_fp32.export(path, **SMALL)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory or a pallax artifact"):
        compiled_fp32.export(notes, overwrite=True, **SMALL)
    assert (notes / "keep.txt").read_text() == "mine"
    compiled_fp32.export(path, overwrite=True, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "notes"]


EXPORT_CHILD = textwrap.dedent(
    """
    import sys, time
    import pallax
    from pallax import atomic_dir

    gguf, path = sys.argv[1:3]
    real = atomic_dir.exchange

    def exchange(a, b):
        done = real(a, b)
        print("SWAPPED", flush=True)
        time.sleep(30)
        return done

    atomic_dir.exchange = exchange
    compiled = pallax.compile(pallax.load(gguf), passes=["int8"])
    compiled.export(path, overwrite=True, cache_sizes=(256,), prefill_sizes=(16,),
                    score_chunk=16)
    """
)


@pytest.mark.slow
def test_export_killed_while_replacing_leaves_a_complete_artifact(
    fp32_artifact, smollm2_gguf_path, tmp_path
):
    """Artifacts are written through the checkpoints' atomic helper: killed right after the
    swap, the path holds the new artifact complete, and the old one is cleaned up on load."""
    import signal

    path = _copy(fp32_artifact, tmp_path / "art")
    child = subprocess.Popen(
        [sys.executable, "-c", EXPORT_CHILD, str(smollm2_gguf_path), str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in child.stdout:
        if line.startswith("SWAPPED"):
            child.send_signal(signal.SIGKILL)
            break
    child.communicate(timeout=120)
    art = pallax.load_artifact(path)
    assert art.manifest["passes"][0]["name"] == "quantize_weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
