"""Bad model inputs fail at the boundary with a clear error."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import pallax


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'gpt-17'.*smollm2-135m"):
        pallax.load("gpt-17")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        pallax.load("/tmp/definitely/missing.gguf")


def test_not_a_gguf(tmp_path):
    f = tmp_path / "weights.gguf"
    f.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        pallax.load(f)


def test_empty_file(tmp_path):
    f = tmp_path / "empty.gguf"
    f.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.gguf' is empty, not a GGUF file"):
        pallax.load(f)


def test_truncated_gguf(tmp_path, smollm2_gguf_path):
    f = tmp_path / "cut.gguf"
    f.write_bytes(smollm2_gguf_path.read_bytes()[: 3 << 20])
    with pytest.raises(ValueError, match="cut.gguf"):
        pallax.load(f)


def test_unsupported_architecture(tmp_path):
    f = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(f), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'mamba' is not supported"):
        pallax.load(f)


def test_unknown_pass_name(smollm2):
    with pytest.raises(ValueError, match="unknown pass 'fuse_everything'"):
        pallax.compile(smollm2, passes=["fuse_everything"])
    with pytest.raises(ValueError, match="not a pass"):
        pallax.compile(smollm2, passes=[42])


def test_gguf_file_reads_what_gguf_reader_reads(smollm2_gguf_path):
    """The fast reader agrees with gguf.GGUFReader on every key and every tensor's bytes."""
    from pallax.model.gguf_file import GGUFFile

    ref, ours = gguf.GGUFReader(str(smollm2_gguf_path)), GGUFFile(smollm2_gguf_path)
    for key, f in ref.fields.items():
        if not key.startswith("GGUF."):  # GGUFReader's pseudo-fields for the header
            assert ours.metadata[key] == pytest.approx(f.contents()), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ref.tensors, ours.tensors, strict=True):
        assert b.shape == tuple(int(d) for d in reversed(a.shape)) and b.ggml_type == a.tensor_type
        assert np.array_equal(np.frombuffer(a.data.tobytes(), np.uint8), ours.raw(b).ravel())


@pytest.mark.parametrize("cut", [30, 5000, 1 << 20])
def test_gguf_truncated_anywhere(tmp_path, smollm2_gguf_path, cut):
    """Cut in the metadata, in the tensor directory or in the tensor data."""
    f = tmp_path / "cut.gguf"
    with open(smollm2_gguf_path, "rb") as src:
        f.write_bytes(src.read(cut))
    with pytest.raises(ValueError, match=r"cut\.gguf.*truncated"):
        pallax.load(f)


def test_gguf_with_tensors_pallax_does_not_use(tmp_path):
    """A Llama GGUF with biases (e.g. a Qwen-style model) is refused, not silently wrong."""
    f = tmp_path / "biased.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    for key, value in dict(
        block_count=1,
        context_length=64,
        embedding_length=8,
        feed_forward_length=16,
        head_count=2,
        head_count_kv=2,
    ).items():
        getattr(w, f"add_{key}")(value)  # fmt: skip
    w.add_vocab_size(32)
    shapes = {"token_embd.weight": (32, 8), "output_norm.weight": (8,),
              "blk.0.attn_norm.weight": (8,), "blk.0.ffn_norm.weight": (8,),
              "blk.0.attn_q.weight": (8, 8), "blk.0.attn_k.weight": (8, 8),
              "blk.0.attn_v.weight": (8, 8), "blk.0.attn_output.weight": (8, 8),
              "blk.0.ffn_gate.weight": (16, 8), "blk.0.ffn_up.weight": (16, 8),
              "blk.0.ffn_down.weight": (8, 16), "blk.0.attn_q.bias": (8,)}  # fmt: skip
    for name, shape in shapes.items():
        w.add_tensor(name, np.zeros(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from pallax.model import gguf_loader

    reader = gguf_loader.open_gguf(f)
    cfg = gguf_loader.config_from_gguf(reader)
    with pytest.raises(ValueError, match=r"biased\.gguf.*blk\.0\.attn_q\.bias"):
        gguf_loader.weights_from_gguf(reader, cfg, origin=str(f))
