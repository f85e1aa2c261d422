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
