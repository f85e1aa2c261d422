"""Planning past this machine: models from a config alone (abstract weights) compile,
shard onto an abstract mesh of 8, report per-device memory and lower for tpu and cuda."""

from __future__ import annotations

import json
import re

import pytest

import pallax

pytestmark = pytest.mark.slow


def _count(text: str, op: str) -> int:  # as CompiledModel.collectives(platform=) counts
    return len(re.findall(rf"stablehlo\.{op}\b", text))


def test_llama3_70b_int8_kivi2_tensor8_reports_and_lowers():
    m = pallax.load("llama-3-70b")
    cfg = m.config
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads) == (80, 8192, 64, 8)
    c = pallax.compile(m, passes=["int8", "kivi2", "shard:tensor=8:abstract=true"])
    assert c.abstract
    whole = pallax.compile(m, passes=["int8", "kivi2"]).memory_report()
    rep = c.memory_report(budget_bytes=16 * 2**30, context=8192)
    assert rep["weight_bytes"] == whole["weight_bytes"]
    # every weight splits 8 ways (64 query and 8 KV heads divide 8; vocab 128256 too)
    assert rep["weight_bytes_per_device"] == pytest.approx(rep["weight_bytes"] / 8, rel=1e-3)
    assert rep["kv_bytes_per_token_per_device"] == rep["kv_bytes_per_token"] / 8
    per_seq = (
        8192 * rep["kv_bytes_per_token_per_device"] + rep["kv_fixed_bytes_per_sequence_per_device"]
    )
    assert rep["max_batch"] == int((16 * 2**30 - rep["weight_bytes_per_device"]) // per_seq)
    for platform, kernel in (("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")):
        exported = c.lower("decode", (platform,))
        assert exported.nr_devices == 8 and exported.platforms == (platform,)
        text = exported.mlir_module()
        # per layer: o and down split by outputs over their gathered inputs (the exact
        # layout: 2 all-gathers each); one psum for the vocabulary-parallel embedding
        assert _count(text, "all_gather") == 4 * 80, platform
        assert _count(text, "all_reduce") == 1 and _count(text, "all_to_all") == 0
        assert text.count(kernel) > 0, platform
        # the kernels see local shapes: wq's and w_down's 1024 of 8192 rows
        assert "tensor<1024x8192xi8>" in text and "tensor<1024x28672xi8>" in text, platform
    # Megatron's layout: o and down split by inputs, W8A8 (a pmax of the activation row's
    # absolute maximum and a psum each)
    megatron = pallax.compile(
        m, passes=["int8", "kivi2", "shard:tensor=8:abstract=true:exact=false"]
    )
    text = megatron.lower("decode", ("tpu",)).mlir_module()
    assert _count(text, "all_reduce") == 4 * 80 + 1 and _count(text, "all_gather") == 0
    assert "tensor<8192x3584xi8>" in text


def test_config_json_fp32_collectives_and_refusals(tmp_path):
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
        "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4,
        "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    m = pallax.load(str(path))
    assert m.config.n_layers == 4 and m.tokenizer is None
    assert {str(w.dtype) for w in m.weights.values()} == {"bfloat16"}
    c = pallax.compile(m, passes=["shard:tensor=4:data=2:abstract=true"])
    assert c.collectives("decode", platform="tpu")["all-reduce"] == 2 * 4 + 1
    rep = c.memory_report()
    assert rep["mesh"] == {"data": 2, "tensor": 4}
    norms = 2 * (2 * 4 + 1) * 1024  # replicated; everything else splits 4 ways
    assert rep["weight_bytes_per_device"] == (rep["weight_bytes"] - norms) // 4 + norms
    assert "P('tensor')" in c.graph("decode")
    with pytest.raises(ValueError, match="abstract weights .* need weights"):
        c.generate(["hello"])
    with pytest.raises(ValueError, match="abstract weights"):
        c.score("hello there")
    with pytest.raises(ValueError, match="calibrates on the model's outputs"):
        pallax.compile(m, passes=["int4-gptq"]).memory_report()
    with pytest.raises(ValueError, match="platforms=.*'gpu'"):
        c.lower("decode", ("gpu",))


def test_abstract_real_model_matches_its_loaded_shapes(smollm2_gguf_path):
    real = pallax.load(smollm2_gguf_path)
    m = pallax.load(smollm2_gguf_path, abstract=True)
    assert {k: tuple(w.shape) for k, w in m.weights.items()} == {
        k: tuple(w.shape) for k, w in real.weights.items()
    }
    for passes in (["int8"], ["int4"], ["bf16", "int8"]):
        a = pallax.compile(m, passes=passes).memory_report()["weight_bytes"]
        assert a == pallax.compile(real, passes=passes).memory_report()["weight_bytes"], passes
    with pytest.raises(ValueError, match="keep_quantized=True reads a GGUF"):
        pallax.load(smollm2_gguf_path, abstract=True, keep_quantized=True)
