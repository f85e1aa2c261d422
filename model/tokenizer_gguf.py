"""Rebuilding a `tokenizers` pipeline from a GGUF's `tokenizer.ggml.*` metadata: vocabulary,
token types, merges or scores, special ids. Supported `tokenizer.ggml.model`s: "gpt2"
(byte-level BPE, split as `tokenizer.ggml.pre` says) and "llama" (SentencePiece-style BPE
with byte fallback)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import gguf
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from pallax.model.gguf_file import GGUFFile
from pallax.text.tokenizer import SUPPORTED_MODELS, Tokenizer, TokenizerConfig, end_of_turn_ids

# Architectures whose "llama" vocabulary follows Gemma's conventions (see `build_sentencepiece`).
_GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3"})


# Token types matched whole in the text: control and unknown as special, user-defined as plain.
_ADDED_TYPES = frozenset(
    {gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN, gguf.TokenType.USER_DEFINED}
)


# Pre-tokenizer splits for "gpt2" vocabularies, keyed by `tokenizer.ggml.pre`. Each entry is the
# list of regexes llama.cpp (llama-vocab.cpp) applies in order, each isolating its matches.
_DIGITS = "digits"


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# SmolLM and StarCoder put every digit on its own before the GPT-2 split (llama.cpp's `\p{N}`;
# `Digits` is what their tokenizer.json uses and differs only on a few rare numerals).
_PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    name: splits
    for names, splits in (
        ("default gpt-2 gpt2 phi-2 mpt olmo jais roberta-bpe trillion", (_GPT2_SPLIT,)),
        ("smollm starcoder refact command-r codeshell exaone minerva-7b", (_DIGITS, _GPT2_SPLIT)),
        ("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral dbrx smaug-bpe", (_LLAMA3_SPLIT,)),
        ("qwen2 deepseek-r1-qwen stablelm2 megrez", (_QWEN2_SPLIT,)),
    )
    for name in names.split()
}


# GGUF value types: struct formats of the scalar ones, and the two compound ones.
@dataclasses.dataclass(frozen=True)
class _GGUFVocab:
    """The tokenizer metadata of a GGUF, validated, as plain Python values."""

    architecture: str
    model: str
    tokens: list[str]
    token_types: list[int]
    meta: Mapping[str, Any]  # every tokenizer.* key

    def special_id(self, name: str) -> int | None:
        value = self.meta.get(f"tokenizer.ggml.{name}_token_id")
        return None if value is None else int(value)


def gguf_vocab(metadata: Mapping[str, Any], source: str) -> _GGUFVocab:
    """The tokenizer part of a GGUF's metadata; fails clearly if missing or unsupported."""
    meta = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
    missing = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if k not in meta]
    if missing:
        raise ValueError(f"GGUF {source} has no tokenizer metadata: missing {missing}")
    model, tokens = meta["tokenizer.ggml.model"], meta["tokenizer.ggml.tokens"]
    needed = {"gpt2": "tokenizer.ggml.merges", "llama": "tokenizer.ggml.scores"}.get(model)
    problem = None
    if needed is None:
        problem = f"tokenizer.ggml.model={model!r} is not supported; allowed: {SUPPORTED_MODELS}"
    elif needed not in meta:
        problem = f"tokenizer.ggml.model={model!r} needs {needed}, which is missing"
    for name in ("token_type", "scores"):
        values = meta.get(f"tokenizer.ggml.{name}")
        if values is not None and len(values) != len(tokens):
            problem = f"tokenizer.ggml.{name} has {len(values)} entries for {len(tokens)} tokens"
    if problem is not None:
        raise ValueError(f"GGUF {source}: {problem}")
    return _GGUFVocab(
        architecture=str(metadata.get("general.architecture", "")),
        model=model,
        tokens=tokens,
        token_types=meta.get("tokenizer.ggml.token_type")
        or [int(gguf.TokenType.NORMAL)] * len(tokens),
        meta=meta,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that spells it in the vocabulary."""
    mapping = {b: chr(b) for b in [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _added_tokens(vocab: _GGUFVocab, tokens: Sequence[str]) -> list[AddedToken]:
    """Control/unknown tokens as special added tokens, user-defined ones as plain added tokens.

    Added tokens are matched whole in the raw text before any splitting, as llama.cpp and
    transformers do, so `<|im_start|>` in a prompt stays one token.
    """
    return [
        AddedToken(token, special=kind != gguf.TokenType.USER_DEFINED, normalized=False)
        for token, kind in zip(tokens, vocab.token_types, strict=True)
        if kind in _ADDED_TYPES
    ]


def build_byte_level(vocab: _GGUFVocab, source: str) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE from the file's vocabulary and merges."""
    pre = vocab.meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZER_SPLITS:
        raise ValueError(
            f"GGUF {source}: tokenizer.ggml.pre={pre!r} is not supported; "
            f"allowed: {sorted(_PRE_TOKENIZER_SPLITS)}"
        )
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Ordinary tokens are stored in the byte alphabet; added ones (control, user-defined) as their
    # text. An ordinary token stored as text is respelled so the BPE can reach it.
    tokens = [
        t
        if set(t) <= alphabet or kind in _ADDED_TYPES
        else "".join(spelling[b] for b in t.encode("utf-8"))
        for t, kind in zip(vocab.tokens, vocab.token_types, strict=True)
    ]
    merges = [tuple(merge.split(" ")) for merge in vocab.meta["tokenizer.ggml.merges"]]
    for index, merge in enumerate(merges):
        if len(merge) != 2:
            raise ValueError(f"GGUF {source}: merge {index} {' '.join(merge)!r} is not 2 tokens")
    backend = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    splits = [
        pre_tokenizers.Digits(individual_digits=True)
        if r == _DIGITS
        else pre_tokenizers.Split(Regex(r), "isolated")
        for r in _PRE_TOKENIZER_SPLITS[pre]
    ]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(_added_tokens(vocab, tokens))
    return backend


def _merges_from_scores(
    ranks: Mapping[str, int], scores: Mapping[str, float]
) -> list[tuple[str, str]]:
    """The BPE merges a scored vocabulary implies: every split of a piece in two, best first.

    Merging the highest-scoring pair first is how SentencePiece BPE (and llama.cpp) tokenizes; as
    merges this runs in the `tokenizers` BPE. Ties are broken as transformers' `generate_merges`.
    """
    merges = []
    for piece, score in scores.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in ranks and piece[i:] in ranks
        ]
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def build_sentencepiece(vocab: _GGUFVocab) -> tokenizers.Tokenizer:
    """SentencePiece-style BPE with byte fallback from a scored "llama" vocabulary.

    Gemma files differ in two ways (as transformers handles them): whitespace-run tokens are
    stored with real spaces and are respelled with "▁", and merge priority follows the token
    order in the file rather than the scores. Gemma also adds no space prefix.
    """
    gemma = vocab.architecture in _GEMMA_ARCHITECTURES
    tokens = list(vocab.tokens)
    if gemma:
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    ranks = {t: i for i, t in enumerate(tokens)}
    if gemma:
        priority: dict[str, float] = {t: -i for i, t in enumerate(tokens)}
    else:
        priority = dict(zip(tokens, vocab.meta["tokenizer.ggml.scores"], strict=True))
    unk_id = vocab.special_id("unknown")
    model = models.BPE(
        vocab=ranks,
        merges=_merges_from_scores(ranks, priority),
        unk_token=tokens[unk_id] if unk_id is not None and unk_id < len(tokens) else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = tokenizers.Tokenizer(model)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "▁")
    else:
        space_prefix = bool(vocab.meta.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if space_prefix else "never", split=False
        )
        if space_prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    # A whitespace run respelled with "▁" is now reached through the BPE, not matched as text.
    backend.add_tokens([t for t in _added_tokens(vocab, vocab.tokens) if t.content in ranks])
    return backend


def _stop_ids(vocab: _GGUFVocab, eos_id: int | None, template: str | None) -> tuple[int, ...]:
    """EOS, the GGUF's eot/eom ids, `<|endoftext|>`, and known end-of-turn tokens that the chat
    template uses (all of them in the vocabulary when there is no template)."""
    ids = {i for i in (eos_id, vocab.special_id("eot"), vocab.special_id("eom")) if i is not None}
    index = {t: i for i, t in enumerate(vocab.tokens)}
    ids |= end_of_turn_ids(index.get, template)
    return tuple(sorted(ids))


def config_from_vocab(vocab: _GGUFVocab) -> TokenizerConfig:
    eos_id = vocab.special_id("eos")
    template = vocab.meta.get("tokenizer.chat_template")
    # A SentencePiece vocabulary without the flag adds BOS (llama.cpp and transformers agree).
    add_bos = vocab.meta.get("tokenizer.ggml.add_bos_token", vocab.model == "llama")
    return TokenizerConfig(
        model=vocab.model,
        vocab_size=len(vocab.tokens),
        bos_id=vocab.special_id("bos"),
        eos_id=eos_id,
        unk_id=vocab.special_id("unknown"),
        pad_id=vocab.special_id("padding"),
        add_bos=bool(add_bos),
        add_eos=bool(vocab.meta.get("tokenizer.ggml.add_eos_token", False)),
        stop_ids=_stop_ids(vocab, eos_id, template),
        chat_template=template,
    )


def tokenizer_from_gguf(source: str | os.PathLike[str] | GGUFFile | gguf.GGUFReader) -> Tokenizer:
    """Builds the tokenizer from a GGUF path, an open `GGUFFile` or a `gguf.GGUFReader`."""
    if isinstance(source, GGUFFile):
        name = repr(str(source.path))
        metadata = source.metadata
    elif isinstance(source, gguf.GGUFReader):
        name = repr(str(getattr(source.data, "filename", None) or "<GGUFReader>"))
        keep = ("tokenizer.", "general.architecture")
        metadata = {k: f.contents() for k, f in source.fields.items() if k.startswith(keep)}
    elif isinstance(source, (str, os.PathLike)):
        name = repr(os.fspath(source))
        if not os.path.isfile(source):
            raise ValueError(f"GGUF path {name} is not a file")
        metadata = GGUFFile(source).metadata
    else:
        raise TypeError(
            f"source must be a path, GGUFFile or gguf.GGUFReader, got {type(source).__name__}"
        )
    vocab = gguf_vocab(metadata, name)
    config = config_from_vocab(vocab)
    backend = build_byte_level(vocab, name) if vocab.model == "gpt2" else build_sentencepiece(vocab)
    return Tokenizer(backend, config)
