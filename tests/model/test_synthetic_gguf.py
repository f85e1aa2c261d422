"""A second Llama-family GGUF, written here, against HF transformers on the same file.

Different shapes from SmolLM2 (untied output head, 4 heads over 2 kv heads,
float16 tensors, linear rope scaling off), the SmolLM2 vocabulary and tokenizer,
random weights: checks that the loader reads the config from metadata rather
than assuming the default model.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import pallax

DIM, LAYERS, HEADS, KV, FFN, CTX = 128, 2, 4, 2, 256, 512


def _permute(w, n_head):
    """llama.cpp's converter interleaves rotary pairs of the Q/K rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, smollm2_gguf_path):
    return write_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf", smollm2_gguf_path)


def write_tiny(path, smollm2_gguf_path, types=None):
    """The tiny model; `types` maps tensor names to a GGML type to store them in (raw
    bytes from gguf's quantizer, or random valid blocks for types it cannot write)."""
    types = types or {}
    src = gguf.GGUFReader(str(smollm2_gguf_path))
    vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(DIM // HEADS)
    f = src.fields
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(f["tokenizer.ggml.pre"].contents())
    w.add_token_list(f["tokenizer.ggml.tokens"].contents())
    w.add_token_types(f["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(f["tokenizer.ggml.merges"].contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    rng = np.random.default_rng(0)

    def t(*shape, scale=0.08):
        return (rng.standard_normal(shape) * scale).astype(np.float16)

    add_float = w.add_tensor

    def add(name, arr):
        kind = types.get(name)
        if kind is None:
            return add_float(name, arr)
        q = gguf.GGMLQuantizationType[kind]
        block, size = gguf.GGML_QUANT_SIZES[q]
        try:
            raw = gguf.quants.quantize(arr.astype(np.float32), q)
        except NotImplementedError:  # random blocks: only the type matters to the loader
            raw = rng.integers(0, 256, (arr.shape[0], arr.shape[1] // block * size), np.uint8)
        add_float(name, raw, raw_dtype=q)

    w.add_tensor = add
    w.add_tensor("token_embd.weight", t(vocab, DIM, scale=0.5))
    w.add_tensor("output.weight", t(vocab, DIM))
    w.add_tensor("output_norm.weight", (1 + t(DIM)).astype(np.float32))
    hd = DIM // HEADS
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", (1 + t(DIM)).astype(np.float32))
        w.add_tensor(p + "ffn_norm.weight", (1 + t(DIM)).astype(np.float32))
        w.add_tensor(p + "attn_q.weight", _permute(t(HEADS * hd, DIM), HEADS))
        w.add_tensor(p + "attn_k.weight", _permute(t(KV * hd, DIM), KV))
        w.add_tensor(p + "attn_v.weight", t(KV * hd, DIM))
        w.add_tensor(p + "attn_output.weight", t(DIM, HEADS * hd))
        w.add_tensor(p + "ffn_gate.weight", t(FFN, DIM))
        w.add_tensor(p + "ffn_up.weight", t(FFN, DIM))
        w.add_tensor(p + "ffn_down.weight", t(DIM, FFN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


KEPT = {
    "blk.0.attn_q.weight": "Q8_0", "blk.0.attn_k.weight": "Q4_0", "blk.0.attn_v.weight": "Q4_1",
    "blk.0.ffn_gate.weight": "Q5_0", "blk.0.ffn_up.weight": "Q5_1", "blk.1.attn_q.weight": "Q4_1",
    "blk.1.attn_k.weight": "Q8_0", "token_embd.weight": "Q8_0", "output.weight": "Q4_0",
}  # fmt: skip


def test_keep_quantized_matches_the_dequantized_file(tmp_path, smollm2_gguf_path, monkeypatch):
    """Kept blocks compute what the float path computes from the same file, including the
    Q/K rows llama.cpp permutes (moved together with their group scales).

    Exact (to float rounding) through XLA's qlinear lowering; the CPU kernel also
    quantizes activations to int8 per block of 32, as llama.cpp does, so with it the
    log-probabilities move by up to about 0.1% (0.016 nats measured on this model)."""
    from pallax.ir.qformat import QuantizedWeight

    path = write_tiny(tmp_path / "mixed.gguf", smollm2_gguf_path, KEPT)
    floats = pallax.load(path)
    kept = pallax.load(path, keep_quantized=True)
    packed = {k for k, v in kept.weights.items() if isinstance(v, QuantizedWeight)}
    assert repr(kept) == repr(floats)  # the same parameter count, packed or not
    assert packed == {
        "layers.0.wq",
        "layers.0.wk",
        "layers.0.wv",
        "layers.0.w_gate",
        "layers.0.w_up",
        "layers.1.wq",
        "layers.1.wk",
        "embed",
        "lm_head",
    }
    assert not any(isinstance(v, QuantizedWeight) for v in floats.weights.values())
    text = "Hello world, this is a small synthetic model with random weights."
    a, b = pallax.compile(floats, []), pallax.compile(kept, [])
    want = a.score(text, chunk_size=8)
    with monkeypatch.context() as m:
        m.setenv("PALLAX_CPU_KERNELS", "0")
        exact = pallax.compile(kept, []).score(text, chunk_size=8)
    np.testing.assert_allclose(exact, want, atol=1e-4)
    np.testing.assert_allclose(b.score(text, chunk_size=8), want, rtol=5e-3, atol=5e-3)
    graph = b.graph("decode")
    assert "qembed" in graph and graph.count("qlinear[") == 7 + 1  # 7 linears + the head
    with pytest.raises(ValueError, match=r"pass 0 \(quantize_weights\) requires float weights"):
        pallax.compile(kept, ["int8"])  # refused before any capture


def test_keep_quantized_refuses_types_it_cannot_keep(tmp_path, smollm2_gguf_path):
    path = write_tiny(tmp_path / "q2k.gguf", smollm2_gguf_path, {"blk.0.ffn_down.weight": "Q2_K"})
    with pytest.raises(ValueError, match=r"'blk.0.ffn_down.weight' cannot be kept quantized.*Q2_K"):
        pallax.load(path, keep_quantized=True)
    with pytest.raises(ValueError, match="keep_quantized='yes' must be True or False"):
        pallax.load(path, keep_quantized="yes")
    with pytest.raises(ValueError, match="keep_quantized=True applies to GGUF files"):
        pallax.load(tmp_path, keep_quantized=True)


def test_tiny_llama_matches_hf(tiny_gguf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = pallax.load(tiny_gguf)
    c = model.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim) == (LAYERS, DIM, HEADS, KV, 32)
    assert not c.tie_embeddings and c.context_length == CTX
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()
    compiled = pallax.compile(model, [])
    text = "Hello world, this is a small synthetic model with random weights."
    ids = model.tokenizer.encode(text)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
    want = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    np.testing.assert_allclose(compiled.score(text, chunk_size=8), want.numpy(), atol=2e-3)
    (out,) = compiled.generate([ids], max_new_tokens=8, ignore_eos=True)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()  # fmt: skip
    assert out.token_ids == ref
