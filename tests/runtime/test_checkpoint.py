"""pallax checkpoints: bit-exact round trips of compiled models, and clear errors on bad input."""

from __future__ import annotations

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallax
from pallax.runtime import checkpoint

PROMPTS = ["The capital of France is", "def fib(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def bf16_checkpoint(compiled_bf16, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "smollm2-bf16"
    compiled_bf16.save(path)
    return path


@pytest.fixture(scope="module")
def bf16_loaded(bf16_checkpoint):
    return pallax.load(bf16_checkpoint)


def _assert_same_weights(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype, name
        g, w = np.asarray(got[name]), np.asarray(w)
        if w.dtype == jnp.bfloat16:
            g, w = g.view(np.uint16), w.view(np.uint16)
        np.testing.assert_array_equal(g, w, err_msg=name)


def test_bf16_round_trip_is_bit_exact(bf16_checkpoint, bf16_loaded, compiled_bf16, smollm2):
    assert checkpoint.is_checkpoint(bf16_checkpoint)
    _assert_same_weights(bf16_loaded.weights, compiled_bf16.weights)
    assert all(w.dtype == jnp.bfloat16 for w in bf16_loaded.weights.values())
    assert bf16_loaded.config == smollm2.config
    # the default fusion pass is not recorded: compile adds it again
    assert bf16_loaded.passes + (pallax.passes.fuse_projections(),) == compiled_bf16.passes
    assert bf16_loaded.source == str(bf16_checkpoint)
    assert bf16_loaded.tokenizer.config == smollm2.tokenizer.config
    for text in [*PROMPTS, "<|im_start|>user\nHi there!<|im_end|>\n", "naïve café 1234 🙂"]:
        assert bf16_loaded.tokenizer.encode(text) == smollm2.tokenizer.encode(text)
    manifest = json.loads((bf16_checkpoint / checkpoint.MANIFEST).read_text())
    assert manifest["format_version"] == checkpoint.FORMAT_VERSION
    assert manifest["passes"] == [{"name": "cast", "dtype": "bfloat16", "activations": True}]
    assert manifest["source"] == smollm2.source


def test_lazy_load_reads_each_slice_bit_exact(bf16_checkpoint, bf16_loaded):
    """lazy=True: LazyWeights over the stored arrays; a slice reads only itself."""
    from pallax.ir.lazy import LazyWeight

    lazy = pallax.load(bf16_checkpoint, lazy=True)
    assert lazy.passes == bf16_loaded.passes and lazy.config == bf16_loaded.config
    for name, w in bf16_loaded.weights.items():
        got = lazy.weights[name]
        assert isinstance(got, LazyWeight) and got.dtype == w.dtype and got.shape == w.shape
        want = np.asarray(w).view(np.uint16)
        np.testing.assert_array_equal(got.read().view(np.uint16), want, err_msg=name)
        if w.ndim == 2:
            part = got.read((slice(1, 3), slice(5, 9)))
            np.testing.assert_array_equal(part.view(np.uint16), want[1:3, 5:9], err_msg=name)
    wq = lazy.weights["layers.0.wq"]
    assert wq.reads[1] == wq.size  # the largest read: the whole array, above
    fresh = pallax.load(bf16_checkpoint, lazy=True).weights["layers.0.wq"]
    fresh.read((slice(0, 2), slice(0, 4)))
    assert fresh.reads == [8, 8]


def test_bf16_round_trip_generates_the_same_tokens(bf16_loaded, compiled_bf16):
    reloaded = pallax.compile(bf16_loaded)
    assert reloaded.passes == compiled_bf16.passes
    kw = dict(max_new_tokens=16, ignore_eos=True)
    want = compiled_bf16.generate(PROMPTS[:2], **kw)
    got = reloaded.generate(PROMPTS[:2], **kw)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_explicit_passes_run_after_the_saved_ones(bf16_loaded, smollm2):
    fuse = pallax.passes.fuse_projections()  # the default fusion runs last
    assert pallax.compile(smollm2).passes == (fuse,)
    cast = pallax.passes.cast("bfloat16")
    assert pallax.compile(bf16_loaded, passes=["fp16"]).passes == (
        cast,
        pallax.passes.cast("float16"),
        fuse,
    )
    assert pallax.compile(bf16_loaded, passes=[]).passes == (cast, fuse)


def test_fp32_round_trip_into_an_empty_directory(compiled_fp32, tmp_path):
    compiled_fp32.save(tmp_path)  # tmp_path exists and is empty
    loaded = pallax.load(tmp_path)
    assert loaded.passes == ()
    _assert_same_weights(loaded.weights, compiled_fp32.weights)


def test_overwrite_replaces_only_a_pallax_checkpoint(bf16_checkpoint, bf16_loaded, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(bf16_checkpoint, path)
    with pytest.raises(ValueError, match="already holds a pallax checkpoint; pass overwrite=True"):
        checkpoint.save_checkpoint(bf16_loaded, path)
    checkpoint.save_checkpoint(bf16_loaded, path, overwrite=True)  # a Model saves as-is
    assert checkpoint.load_checkpoint(path).passes == bf16_loaded.passes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial directory left

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not an empty directory or a pallax checkpoint"):
        checkpoint.save_checkpoint(bf16_loaded, other, overwrite=True)
    assert (other / "todo.txt").read_text() == "keep me"


@pytest.fixture
def broken(bf16_checkpoint, tmp_path):
    """A fresh copy of the bf16 checkpoint to damage."""
    path = tmp_path / "ckpt"
    shutil.copytree(bf16_checkpoint, path)
    return path


@pytest.fixture
def edited(bf16_checkpoint, tmp_path):
    """The bf16 checkpoint with a copy of its manifest to edit (the rest linked, not copied)."""
    path = tmp_path / "ckpt"
    path.mkdir()
    shutil.copy(bf16_checkpoint / checkpoint.MANIFEST, path)
    for sub in ("tokenizer", "weights"):
        (path / sub).symlink_to(bf16_checkpoint / sub)
    return path


def _edit_manifest(path, edit, *, resign=True):
    """Edit the manifest; `resign` recomputes its own digest, as a consistent but wrong
    manifest would have it (the deeper checks must still refuse it)."""
    file = path / checkpoint.MANIFEST
    manifest = json.loads(file.read_text())
    edit(manifest)
    if resign and "manifest_sha256" in manifest:
        manifest["manifest_sha256"] = checkpoint._manifest_digest(manifest)
    file.write_text(json.dumps(manifest))


def _set(*keys, value):
    def edit(m):
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            _set("format_version", value=checkpoint.FORMAT_VERSION + 1),
            f"newer pallax.*format_version {checkpoint.FORMAT_VERSION + 1}, "
            f"this pallax reads {checkpoint.FORMAT_VERSION}",
        ),
        (lambda m: m.pop("config"), r"lacks the keys \['config'\]"),
        (_set("format", value="safetensors"), "format='safetensors'"),
        (_set("passes", value=[{"name": "quantize", "bits": 4}]), "unknown pass 'quantize'"),
        (_set("passes", 0, "dtype", value="int8"), "cannot rebuild pass.*int8"),
        (_set("config", "ffn_dim", value=1000), "'layers.0.w_gate' has shape.*config implies"),
        (_set("weights", "embed", "shape", value=[49152, 512]), "'embed' has shape"),
        (_set("weights", "final_norm", "dtype", value="float32"), "'final_norm' is stored as bf"),
        (_set("weights", "embed", "dtype", value="int77"), "bad config or weights"),
    ],
)
def test_bad_manifest(edited, edit, match):
    _edit_manifest(edited, edit)
    with pytest.raises(ValueError, match=match) as info:
        pallax.load(edited)
    assert str(edited) in str(info.value)


@pytest.mark.parametrize(
    "edit",
    [
        _set("config", "rope_theta", value=1000 * 100000.0),
        _set("config", "norm_eps", value=0.5),
        _set("passes", value=[]),
        _set("source", value="elsewhere"),
        lambda m: m.pop("manifest_sha256"),
    ],
    ids=["rope_theta", "norm_eps", "passes", "source", "no digest"],
)
def test_edited_manifest_is_refused(edited, edit):
    """Anything that shapes the computation is covered by the manifest's own digest."""
    _edit_manifest(edited, edit, resign=False)
    with pytest.raises(ValueError, match="was changed after it was written") as info:
        pallax.load(edited)
    assert str(edited) in str(info.value)


def test_unlisted_files_are_refused(broken):
    """A weights file whose bytes changed and whose entry was dropped from the file list,
    or a file added, is not silently trusted."""
    file = _largest_weights_file(broken)
    name = file.relative_to(broken).as_posix()
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10
    file.write_bytes(data)
    _edit_manifest(broken, lambda m: m["files"].pop(name))
    with pytest.raises(ValueError, match=f"not listed in .*{re.escape(name)}"):
        pallax.load(broken)


def test_added_file_is_refused(broken):
    (broken / "weights" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"not listed in .*weights/extra.bin"):
        pallax.load(broken)


def test_format_2_checkpoints_still_load(broken, bf16_loaded):
    """Checkpoints written before the manifest digest (format 2) load with the stricter
    file checks."""

    def as_v2(m):
        m.pop("manifest_sha256")
        m["format_version"] = 2

    _edit_manifest(broken, as_v2, resign=False)
    old = pallax.load(broken)
    _assert_same_weights(old.weights, bf16_loaded.weights)


def test_save_through_a_symlink(compiled_bf16, bf16_loaded, tmp_path):
    """A link to a checkpoint directory keeps pointing at the replaced checkpoint."""
    target = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    compiled_bf16.save(link)
    assert link.is_symlink() and (target / checkpoint.MANIFEST).is_file()
    compiled_bf16.save(link, overwrite=True)
    assert link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    _assert_same_weights(pallax.load(link).weights, bf16_loaded.weights)


def test_save_leaves_no_temporaries_after_a_crash(compiled_bf16, tmp_path):
    """What a killed save left (a temporary of a process that is gone) is removed by the
    next save; a missing checkpoint whose old copy was set aside is put back on load."""
    path = tmp_path / "ckpt"
    compiled_bf16.save(path)
    dead = 2**22 + 12345  # above pid_max's default: no such process
    (tmp_path / f".ckpt.partial-{dead}-0badc0de").mkdir()
    compiled_bf16.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    path.rename(tmp_path / f".ckpt.old-{dead}-0badc0de")
    assert pallax.load(path).config == compiled_bf16.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_manifest_that_is_not_json(edited):
    file = edited / checkpoint.MANIFEST
    file.write_text(file.read_text()[:100])
    with pytest.raises(ValueError, match=f"{checkpoint.MANIFEST}' is not valid JSON"):
        pallax.load(edited)


@pytest.mark.parametrize("sub", ["tokenizer", "weights"])
def test_missing_directory(broken, sub):
    shutil.rmtree(broken / sub)
    with pytest.raises(
        FileNotFoundError, match=f"{re.escape(str(broken))}.*the {sub}/ directory is missing"
    ):
        pallax.load(broken)


def _largest_weights_file(path):
    files = [f for f in (path / "weights").rglob("*") if f.is_file()]
    return max(files, key=lambda f: f.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bit flip", "delete"])
def test_corrupted_weights_file(broken, damage):
    file = _largest_weights_file(broken)
    data = bytearray(file.read_bytes())
    if damage == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        data[1000:2000] = b"\xff" * 1000
        file.write_bytes(data)
    elif damage == "bit flip":
        data[len(data) // 2] ^= 0x10
        file.write_bytes(data)
    else:
        file.unlink()
    name = file.relative_to(broken).as_posix()
    error = FileNotFoundError if damage == "delete" else ValueError
    with pytest.raises(error, match=f"{re.escape(str(broken))}.*the file {re.escape(name)} is"):
        pallax.load(broken)


def test_orbax_errors_name_the_checkpoint(broken):
    """Damage that the checksums do not see (they were updated too) still fails clearly."""
    file = broken / "weights" / "manifest.ocdbt"
    file.write_bytes(b"not an ocdbt manifest")
    name = file.relative_to(broken).as_posix()
    _edit_manifest(broken, _set("files", name, value=checkpoint._sha256(file)))
    with pytest.raises(ValueError, match=f"{re.escape(str(broken))}.*cannot read the weights"):
        pallax.load(broken)


def test_save_refuses_a_file(compiled_bf16, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="not an empty directory or a pallax checkpoint"):
        compiled_bf16.save(path)


@pytest.mark.parametrize("source", ["pass", "gguf"])
def test_packed_weights_round_trip(source, smollm2, smollm2_gguf_path, tmp_path):
    """Quantized weights (a quantize pass with the head, or int4 kept from the GGUF) are
    stored as their packed arrays and come back bit for bit, still packed."""
    from pallax.ir.qformat import QuantizedWeight

    if source == "pass":
        p = pallax.passes.quantize_weights(8, head=True, embeddings=True)
        compiled = pallax.compile(smollm2, passes=["bf16", p])
    else:
        compiled = pallax.compile(pallax.load(smollm2_gguf_path, keep_quantized=True))
    compiled.save(tmp_path / "q")
    loaded = pallax.load(tmp_path / "q")
    packed = {k for k, w in compiled.weights.items() if isinstance(w, QuantizedWeight)}
    assert packed and packed == {k for k, w in loaded.weights.items()
                                 if isinstance(w, QuantizedWeight)}  # fmt: skip
    for name in packed:
        a, b = compiled.weights[name], loaded.weights[name]
        assert (a.bits, a.group_size, a.in_features) == (b.bits, b.group_size, b.in_features)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    assert all(p.name != "quantize_weights" for p in loaded.passes)  # lives on in the weights
    reloaded = pallax.compile(loaded)
    assert reloaded.graph("decode").count("qlinear[") >= 7 * smollm2.config.n_layers
    kw = dict(max_new_tokens=12, ignore_eos=True)
    want = [r.token_ids for r in compiled.generate(PROMPTS[:2], **kw)]
    assert [r.token_ids for r in reloaded.generate(PROMPTS[:2], **kw)] == want
    # lazily: every packed array a LazyWeight reading the same values; compiled without
    # the shard pass, they are read whole and generate the same tokens
    from pallax.ir.lazy import LazyWeight

    lazy = pallax.load(tmp_path / "q", lazy=True)
    for name in packed:
        a, b = loaded.weights[name], lazy.weights[name]
        assert isinstance(b, QuantizedWeight) and b.bits == a.bits
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            assert isinstance(y, LazyWeight) and y.dtype == x.dtype
            np.testing.assert_array_equal(y.read(), np.asarray(x), err_msg=name)
    lazy = pallax.load(tmp_path / "q", lazy=True)
    assert [r.token_ids for r in pallax.compile(lazy).generate(PROMPTS[:2], **kw)] == want
