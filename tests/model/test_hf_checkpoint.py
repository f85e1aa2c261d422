"""Hugging Face checkpoint directories (config.json + safetensors + tokenizer files).

The real models are saved by transformers from the same GGUF pallax reads, so the directory
must give the same config, weights, token ids and greedy generations as the GGUF. Tiny random
models check the names and layouts against transformers' own forward pass, and synthetic
directories check that bad input fails with an error naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import tokenizers

import pallax
from pallax.model import hf_checkpoint

PROMPTS = ["The capital of France is", "def fib(n):", "Once upon a time, in a small village,"]
TEXTS = [*PROMPTS, "<|im_start|>user\nHi there!<|im_end|>\n", "naïve café 🙂 x=42;"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _save_hf(model, path, **kwargs):
    """`save_pretrained` of a model transformers loaded from a GGUF. Its weights are plain
    dequantized tensors, but transformers refuses to save a model that has a GGUF quantizer,
    so the quantizer is detached meanwhile (the model is a shared session fixture)."""
    quantizer = model.hf_quantizer
    quant_config = vars(model.config).pop("quantization_config", None)
    model.hf_quantizer = None
    try:
        model.save_pretrained(path, **kwargs)
    finally:
        model.hf_quantizer = quantizer
        model.config.quantization_config = quant_config


def _assert_same_model(got, want, atol=0.0):
    assert dataclasses.replace(got.config, name=want.config.name) == want.config
    assert sorted(got.weights) == sorted(want.weights)
    for name, w in want.weights.items():
        assert got.weights[name].dtype == jnp.float32, name
        np.testing.assert_allclose(got.weights[name], w, rtol=0, atol=atol, err_msg=name)
    assert got.tokenizer.config == want.tokenizer.config
    for text in TEXTS:
        assert got.tokenizer.encode(text) == want.tokenizer.encode(text), text


def _greedy_ids(compiled):
    outs = compiled.generate(PROMPTS, max_new_tokens=16, temperature=0.0)
    return [r.token_ids for r in outs]


# ---------------------------------------------------------------- SmolLM2, saved by transformers


@pytest.fixture(scope="module")
def smollm2_hf_dir(hf_smollm2, tmp_path_factory):
    model, tok = hf_smollm2
    path = tmp_path_factory.mktemp("hf") / "smollm2"
    _save_hf(model, path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def smollm2_from_hf(smollm2_hf_dir):
    return pallax.load(smollm2_hf_dir)


def test_smollm2_directory_is_the_gguf_model(smollm2_from_hf, smollm2, smollm2_hf_dir):
    assert (smollm2_hf_dir / "model.safetensors").is_file()
    assert smollm2_from_hf.source == str(smollm2_hf_dir)
    assert smollm2_from_hf.config.name == "smollm2"
    # The same dequantized values; HF's Q/K rows are already in pallax's rotate-half order.
    _assert_same_model(smollm2_from_hf, smollm2)
    # transformers' GGUF tokenizer drops SmolLM2's digit split (see test_tokenizer.py), and
    # the directory holds that tokenizer, so text with spaces before digits differs.
    text = "x  1"
    assert smollm2_from_hf.tokenizer.encode(text) != smollm2.tokenizer.encode(text)


def test_smollm2_directory_generates_like_gguf(smollm2_from_hf, compiled_fp32):
    compiled = pallax.compile(smollm2_from_hf, passes=[])
    assert _greedy_ids(compiled) == _greedy_ids(compiled_fp32)


def test_sharded_directory_loads_identically(hf_smollm2, smollm2_hf_dir, smollm2_from_hf, tmp_path):
    _save_hf(hf_smollm2[0], tmp_path, max_shard_size="50MB")
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_hf_dir / name, tmp_path)
    assert (tmp_path / hf_checkpoint.INDEX_FILE).is_file()
    assert not (tmp_path / hf_checkpoint.WEIGHTS_FILE).exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    _assert_same_model(pallax.load(tmp_path), smollm2_from_hf)


# ---------------------------------------------------------------- Gemma 3, saved by transformers


@pytest.fixture(scope="module")
def gemma3_hf_dir(hf_gemma3, gemma3, tmp_path_factory):
    """transformers' Gemma 3 saved, with tokenizer files written from pallax's GGUF tokenizer
    (transformers takes ~35 s to convert the GGUF vocabulary): a tokenizer.json whose
    post-processor adds <bos>, and token strings in tokenizer_config.json, as HF writes them."""
    path = tmp_path_factory.mktemp("hf") / "gemma3"
    _save_hf(hf_gemma3, path)
    tok = gemma3.tokenizer
    backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    bos = tok.backend.id_to_token(tok.bos_id)
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.bos_id)]
    )
    backend.save(str(path / "tokenizer.json"))
    c = tok.config
    specials = {"bos_token": c.bos_id, "eos_token": c.eos_id, "unk_token": c.unk_id}
    specials["pad_token"] = c.pad_id
    tokenizer_config = {k: tok.backend.id_to_token(i) for k, i in specials.items()}
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if c.chat_template is not None:
        (path / "chat_template.jinja").write_text(c.chat_template)
    return path


@pytest.mark.slow
def test_gemma3_directory_is_the_gguf_model(gemma3_hf_dir, gemma3, compiled_gemma3):
    loaded = pallax.load(gemma3_hf_dir)
    assert json.loads((gemma3_hf_dir / "config.json").read_text())["model_type"] == "gemma3_text"
    # transformers stores Gemma norm weights as w (multiplier 1 + w); pallax adds the 1 back.
    _assert_same_model(loaded, gemma3, atol=1e-6)
    lazy = pallax.load(gemma3_hf_dir, lazy=True)  # the 1 added as each slice is read
    for name, w in loaded.weights.items():
        np.testing.assert_array_equal(lazy.weights[name].read(), w, err_msg=name)
    assert _greedy_ids(pallax.compile(loaded, passes=[])) == _greedy_ids(compiled_gemma3)


# ---------------------------------------------------------------- tiny random models, transformers

TINY_TEXT = dict(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
)  # fmt: skip
GEMMA3_TEXT = dict(
    TINY_TEXT,
    sliding_window=4,
    query_pre_attn_scalar=16,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    },
)


def _write_tokenizer(path, vocab_size):
    """A character-level BPE over the first `vocab_size` printable characters."""
    vocab = {chr(33 + i): i for i in range(vocab_size)}
    tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [])).save(str(path / "tokenizer.json"))


def _hf_tiny(kind):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            **TINY_TEXT,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e4},
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "gemma3_text":
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**GEMMA3_TEXT))
    else:
        vision = dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
        )  # fmt: skip
        cfg = transformers.Gemma3Config(
            text_config=GEMMA3_TEXT, vision_config=vision, mm_tokens_per_image=4
        )
        model = transformers.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in model.parameters():  # Gemma inits norms to 0: make every weight matter
            p.normal_(0.0, 0.1)
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.mark.parametrize("kind", ["llama", "gemma3_text", "gemma3"])
def test_tiny_model_matches_transformers(kind, tmp_path):
    torch = pytest.importorskip("torch")
    hf = _hf_tiny(kind)
    hf.save_pretrained(tmp_path)
    _write_tokenizer(tmp_path, TINY_TEXT["vocab_size"])
    model = pallax.load(tmp_path)
    c = model.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim) == (3, 64, 4, 2, 16)
    assert c.rope_scaling == 2.0
    if kind == "llama":
        assert not c.tie_embeddings and c.rope_theta == 5e4 and c.mlp_kind == "swiglu"
    else:
        assert c.layer_types == ("sliding", "global", "sliding") and c.sliding_window == 4
        assert (c.rope_theta, c.rope_local_theta, c.embed_scale) == (1e6, 1e4, 8.0)
    ids = np.random.default_rng(0).integers(0, TINY_TEXT["vocab_size"], 12)
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids[None])).logits[0].numpy()
    cache = model.cache_layout().allocate(1, 16)
    tokens, pos = jnp.asarray([ids], jnp.int32), jnp.zeros(1, jnp.int32)
    got, _ = model.forward(model.weights, cache, tokens, pos)
    # float32 through 3 layers of width 64-128: both sides round differently at ~1e-6 per op.
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)


def test_older_multimodal_gemma3_names(tmp_path):
    """transformers 4.52-4.57 saved a multimodal Gemma 3 as model.language_model.* and
    model.vision_tower.*; transformers 5 and the original checkpoints as language_model.model.*."""
    hf = _hf_tiny("gemma3")
    hf.save_pretrained(tmp_path / "new")
    _write_tokenizer(tmp_path / "new", TINY_TEXT["vocab_size"])
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    renamed = {}
    for name, array in safetensors_numpy.load_file(old / "model.safetensors").items():
        name = name.replace("language_model.model.", "model.language_model.")
        renamed[name if name.startswith("model.") else "model." + name] = array
    assert "model.vision_tower.embeddings.patch_embedding.weight" in renamed
    _write_safetensors(old / "model.safetensors", renamed)
    new_model, old_model = pallax.load(tmp_path / "new"), pallax.load(old)
    for name, w in new_model.weights.items():
        np.testing.assert_array_equal(old_model.weights[name], w, err_msg=name)


@pytest.mark.parametrize(
    "raw",
    [
        # Google's gemma-3-4b-it: the text_config holds only what differs from the defaults.
        {
            "model_type": "gemma3",
            "text_config": {
                "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                "num_hidden_layers": 34, "sliding_window": 1024,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            },
        },
        # transformers 4.5x Gemma 3 text keys.
        dict(
            TINY_TEXT, model_type="gemma3_text", rope_theta=5e5, rope_local_base_freq=2e4,
            sliding_window_pattern=4, sliding_window=8, query_pre_attn_scalar=32,
        ),
        dict(
            TINY_TEXT, model_type="llama", rope_theta=5e5,
            rope_scaling={"type": "linear", "factor": 4.0}, tie_word_embeddings=False,
        ),
    ],
)  # fmt: skip
def test_config_reads_as_transformers_does(raw):
    transformers = pytest.importorskip("transformers")
    cfg = hf_checkpoint.config_from_hf(raw)
    hf = transformers.AutoConfig.for_model(**raw).get_text_config()
    rope = hf.rope_parameters
    full, local = rope.get("full_attention", rope), rope.get("sliding_attention", {})
    layer_types = getattr(hf, "layer_types", None) or []
    want = dict(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads, head_dim=hf.head_dim,
        ffn_dim=hf.intermediate_size, context_length=hf.max_position_embeddings,
        norm_eps=hf.rms_norm_eps, tie_embeddings=hf.tie_word_embeddings,
        rope_theta=full["rope_theta"], rope_scaling=full.get("factor", 1.0),
        rope_local_theta=local.get("rope_theta"),
        layer_types=tuple("global" if t == "full_attention" else "sliding" for t in layer_types),
        sliding_window=getattr(hf, "sliding_window", None),
        query_pre_attn_scalar=getattr(hf, "query_pre_attn_scalar", None),
    )  # fmt: skip
    assert {k: getattr(cfg, k) for k in want} == want


# ---------------------------------------------------------------- synthetic directories

LLAMA = dict(
    model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)  # fmt: skip
_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_ST_DTYPES["int32"] = "I32"


def _write_safetensors(file, tensors):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        entry = {"dtype": _ST_DTYPES[array.dtype.name], "shape": list(array.shape)}
        header[name] = {**entry, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    file.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def _llama_tensors(dtype=np.float32):
    d, f, v, kv = 16, 32, 32, 8
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    p = "model.layers.0."
    for name, shape in [
        ("input_layernorm", (d,)), ("post_attention_layernorm", (d,)),
        ("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (kv, d)),
        ("self_attn.v_proj", (kv, d)), ("self_attn.o_proj", (d, d)),
        ("mlp.gate_proj", (f, d)), ("mlp.up_proj", (f, d)), ("mlp.down_proj", (d, f)),
    ]:  # fmt: skip
        shapes[f"{p}{name}.weight"] = shape
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}


def _synthetic_dir(path, config=LLAMA, tensors=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    _write_safetensors(path / "model.safetensors", _llama_tensors() if tensors is None else tensors)
    _write_tokenizer(path, LLAMA["vocab_size"])
    return path


@pytest.mark.parametrize("dtype", [np.float64, np.float16, ml_dtypes.bfloat16])
def test_float_dtypes_load_as_float32(dtype, tmp_path):
    tensors = _llama_tensors(dtype)
    model = pallax.load(_synthetic_dir(tmp_path, tensors=tensors))
    np.testing.assert_array_equal(
        model.weights["layers.0.wq"],
        tensors["model.layers.0.self_attn.q_proj.weight"].astype(np.float32),
    )
    assert all(w.dtype == jnp.float32 for w in model.weights.values())
    lazy = pallax.load(tmp_path, lazy=True)  # read from the mapped file where placed
    for name, w in model.weights.items():
        np.testing.assert_array_equal(lazy.weights[name].read(), w, err_msg=name)


def test_tied_head_is_skipped_and_untied_head_required(tmp_path):
    tensors = _llama_tensors()
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    assert "lm_head" not in pallax.load(_synthetic_dir(tmp_path / "a", tensors=tensors)).weights
    untied = dict(LLAMA, tie_word_embeddings=False)
    loaded = pallax.load(_synthetic_dir(tmp_path / "b", untied, tensors))
    np.testing.assert_array_equal(loaded.weights["lm_head"], tensors["lm_head.weight"])
    with pytest.raises(ValueError, match=r"missing tensors for llama.*'lm_head'"):
        pallax.load(_synthetic_dir(tmp_path / "c", untied))


def test_tokenizer_settings_from_tokenizer_config(tmp_path):
    path = _synthetic_dir(tmp_path)
    settings = {"bos_token": "!", "eos_token": {"content": '"'}, "add_bos_token": True}
    (path / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": "{{x}}"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    tok = pallax.load(path).tokenizer
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (0, 1, frozenset({1, 5}))
    assert tok.encode("#$") == [0, 2, 3] and tok.config.chat_template == "{{x}}"


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="has no config.json"):
        pallax.load(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"model_type": "mistral"}, r"model_type 'mistral' is not supported; supported: \('llama'"),
        ({"hidden_size": None}, r"missing required keys \['hidden_size'\]"),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu' \(pallax has 'silu'\)"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type 'llama3' is not"),
        ({"model_type": "gemma3"}, "needs a text_config"),
    ],
)
def test_bad_config(edit, message, tmp_path):
    config = {k: v for k, v in {**LLAMA, **edit}.items() if v is not None}
    _synthetic_dir(tmp_path, config)
    with pytest.raises(ValueError, match=f"config.json.*{message}"):
        pallax.load(tmp_path)


def test_config_is_not_json(tmp_path):
    _synthetic_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match="config.json' is not valid JSON"):
        pallax.load(tmp_path)


def test_no_safetensors(tmp_path):
    _synthetic_dir(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors .*'pytorch_model.bin'"):
        pallax.load(tmp_path)


def test_index_refers_to_missing_shard(tmp_path):
    _synthetic_dir(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00002.safetensors")
    weight_map = {name: "model-00001-of-00002.safetensors" for name in _llama_tensors()}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / hf_checkpoint.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match=r"index.json' refers to shard 'model-00002-of"):
        pallax.load(tmp_path)


def test_shape_disagrees_with_config(tmp_path):
    tensors = _llama_tensors()
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 16), np.float32)
    _synthetic_dir(tmp_path, tensors=tensors)
    with pytest.raises(
        ValueError,
        match=r"model.safetensors': tensor 'model.layers.0.self_attn.k_proj.weight' has shape "
        r"\(16, 16\), but config.json implies \(8, 16\)",
    ):
        pallax.load(tmp_path)


def test_unknown_tensor(tmp_path):
    tensors = _llama_tensors()
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(16, np.float32)
    _synthetic_dir(tmp_path, tensors=tensors)
    with pytest.raises(ValueError, match=r"does not use .*'model.layers.0.self_attn.q_proj.bias'"):
        pallax.load(tmp_path)


def test_unsupported_dtype(tmp_path):
    tensors = _llama_tensors()
    tensors["model.norm.weight"] = np.ones(16, np.int32)
    _synthetic_dir(tmp_path, tensors=tensors)
    with pytest.raises(ValueError, match=r"'model.norm.weight' has dtype I32; supported: \['F64'"):
        pallax.load(tmp_path)


def _corrupt_header_length(data):
    return (len(data)).to_bytes(8, "little") + data[8:]


def _corrupt_header_json(data):
    return data[:8] + b"#" + data[9:]


def _truncate(data):
    return data[:-100]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_corrupt_header_length, r"truncated or not a safetensors file: header length \d+ runs"),
        (_corrupt_header_json, "safetensors header is not valid JSON"),
        (_truncate, r"data_offsets end \d+ runs past the end of the file"),
        (lambda data: data[:5], "truncated or not a safetensors file"),
    ],
)
def test_corrupted_safetensors(corrupt, message, tmp_path):
    file = _synthetic_dir(tmp_path) / "model.safetensors"
    file.write_bytes(corrupt(file.read_bytes()))
    with pytest.raises(ValueError, match=f"model.safetensors'.*{message}"):
        pallax.load(tmp_path)


def test_missing_tokenizer(tmp_path):
    (_synthetic_dir(tmp_path) / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        pallax.load(tmp_path)
