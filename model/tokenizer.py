"""Text <-> token ids for a GGUF model, built from the GGUF's own tokenizer metadata.

A GGUF has no tokenizer.json, only llama.cpp's `tokenizer.ggml.*` keys (vocabulary, token types,
merges or scores, special ids). This rebuilds a `tokenizers` pipeline from them, so pallax needs
neither transformers nor a hub repository. Supported `tokenizer.ggml.model`s: "gpt2" (byte-level
BPE, split as `tokenizer.ggml.pre` says) and "llama" (SentencePiece-style BPE with byte fallback).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import operator
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import gguf
import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from pallax.model.gguf_file import GGUFFile

SUPPORTED_MODELS = ("gpt2", "llama")
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "pallax_tokenizer.json"
_CONFIG_FORMAT = 1

# Architectures whose "llama" vocabulary follows Gemma's conventions (see `_build_sentencepiece`).
_GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3"})

# Tokens that end a turn in common chat formats. They stop generation next to EOS.
_END_OF_TURN_TOKENS = (
    "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
    "<|end_of_turn|>", "<|return|>", "<|call|>", "<EOT>",
)  # fmt: skip
_END_OF_TEXT = "<|endoftext|>"
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


def check_text(text: str, what: str = "text") -> None:
    """Refuse text that is not valid Unicode: a lone surrogate (from bytes decoded with
    `surrogateescape`, as the command line does with invalid UTF-8, or from JSON), which
    no tokenizer can encode. Names the position and what surrounds it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raw = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else None
        char = raw or f"lone surrogate U+{ord(bad):04X}"
        raise ValueError(
            f"{what} is not valid Unicode: {char} at character {e.start} (after "
            f"{text[max(0, e.start - 20) : e.start]!r}); give UTF-8 text"
        ) from None


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """What a tokenizer needs beyond tokenizer.json (special ids, BOS/EOS policy, chat template),
    kept apart so a checkpoint can store it as a small JSON next to tokenizer.json."""

    model: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    stop_ids: tuple[int, ...]
    chat_template: str | None

    def __post_init__(self) -> None:
        if self.model not in SUPPORTED_MODELS:
            raise ValueError(
                f"tokenizer model {self.model!r} is not supported; allowed: {SUPPORTED_MODELS}"
            )
        if self.vocab_size <= 0:
            raise ValueError(f"{self.vocab_size=} must be positive")
        named = [(n, getattr(self, n)) for n in ("bos_id", "eos_id", "unk_id", "pad_id")]
        for name, value in [*named, *(("stop_ids", i) for i in self.stop_ids)]:
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is out of range for vocab_size={self.vocab_size}")
        for flag, token_id in (("add_bos", self.bos_id), ("add_eos", self.eos_id)):
            if getattr(self, flag) and token_id is None:
                raise ValueError(f"{flag}=True but the vocabulary has no {flag[4:].upper()} token")


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


def _gguf_vocab(metadata: Mapping[str, Any], source: str) -> _GGUFVocab:
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


def _build_byte_level(vocab: _GGUFVocab, source: str) -> tokenizers.Tokenizer:
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


def _build_sentencepiece(vocab: _GGUFVocab) -> tokenizers.Tokenizer:
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


def end_of_turn_ids(token_to_id: Callable[[str], int | None], template: str | None) -> set[int]:
    """`<|endoftext|>` and the known end-of-turn tokens the chat template uses (all of them
    when there is no template), as far as the vocabulary has them."""
    tokens = [t for t in _END_OF_TURN_TOKENS if template is None or t in template]
    ids = {token_to_id(t) for t in (*tokens, _END_OF_TEXT)}
    return {i for i in ids if i is not None}


def _config_from_vocab(vocab: _GGUFVocab) -> TokenizerConfig:
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


class _GenerationTag(jinja2.ext.Extension):
    """Renders the body of `{% generation %}...{% endgeneration %}`, which some templates use."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any) -> str:
    """Jinja's `tojson` without HTML escaping, as transformers defines it for chat templates."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kwargs)


def _compile_chat_template(template: str) -> jinja2.Template:
    """Compiles a chat template in the same sandboxed environment transformers renders it in."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


class Tokenizer:
    """Text <-> token ids for one model, from `Tokenizer.from_gguf` or `Tokenizer.load`."""

    def __init__(self, backend: tokenizers.Tokenizer, config: TokenizerConfig):
        self._backend = backend
        self._config = config
        self._template: jinja2.Template | None = None

    @classmethod
    def from_gguf(cls, source: str | os.PathLike[str] | GGUFFile | gguf.GGUFReader) -> Tokenizer:
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
        vocab = _gguf_vocab(metadata, name)
        config = _config_from_vocab(vocab)
        backend = (
            _build_byte_level(vocab, name) if vocab.model == "gpt2" else _build_sentencepiece(vocab)
        )
        return cls(backend, config)

    @property
    def config(self) -> TokenizerConfig:
        return self._config

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (for offsets, batch encoding, etc.)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._config.vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._config.bos_id

    @property
    def eos_id(self) -> int | None:
        return self._config.eos_id

    @property
    def pad_id(self) -> int | None:
        return self._config.pad_id

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS plus the end-of-turn tokens of the chat format."""
        return frozenset(self._config.stop_ids)

    def __repr__(self) -> str:
        return f"Tokenizer(model={self._config.model!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in it become single tokens.

        `add_special_tokens` adds BOS (and EOS) only where the GGUF asks for them.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        check_text(text)
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self._config.add_bos:
            ids = [self._config.bos_id, *ids]
        if add_special_tokens and self._config.add_eos:
            ids = [*ids, self._config.eos_id]
        return ids

    def _check_ids(self, ids: Iterable[Any]) -> list[int]:
        try:
            checked = [operator.index(i) for i in ids]
        except TypeError as e:
            raise TypeError(f"token ids must be integers: {e}") from None
        n = self._config.vocab_size
        for position, token_id in enumerate(checked):
            if not 0 <= token_id < n:
                raise ValueError(
                    f"token id {token_id} at position {position} is out of range for vocab_size={n}"
                )
        return checked

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; bytes that do not form valid UTF-8 become U+FFFD."""
        return self._backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def _special_token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Renders `messages` with the GGUF's jinja chat template, like transformers' method.

        The template sees `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
        `unk_token`, `pad_token`, `tools`/`documents` (None unless given) and any extra kwargs.
        With `tokenize=True` returns ids, adding no BOS beyond what the template writes.
        """
        if self._config.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (the GGUF has no tokenizer.chat_template)"
            )
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise TypeError(f"messages must be a sequence of dicts, got {type(messages).__name__}")
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message:
                raise ValueError(
                    f"message {index} must be a mapping with a 'role', got {message!r}"
                )
        if self._template is None:
            self._template = _compile_chat_template(self._config.chat_template)
        c = self._config
        context = {
            "bos_token": self._special_token_text(c.bos_id),
            "eos_token": self._special_token_text(c.eos_id),
            "unk_token": self._special_token_text(c.unk_id),
            "pad_token": self._special_token_text(c.pad_id),
            "tools": None,
            "documents": None,
            **kwargs,
        }
        text = self._template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **context,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Writes tokenizer.json and the `TokenizerConfig` as pallax_tokenizer.json."""
        path = pathlib.Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(path / TOKENIZER_FILE))
        payload = {"format": _CONFIG_FORMAT, **dataclasses.asdict(self._config)}
        (path / CONFIG_FILE).write_text(
            json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Reads a tokenizer written by `save`."""
        path = pathlib.Path(directory)
        for name in (TOKENIZER_FILE, CONFIG_FILE):
            if not (path / name).is_file():
                raise ValueError(f"tokenizer directory {os.fspath(path)!r} has no {name}")
        payload = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        version = payload.pop("format", None)
        if version != _CONFIG_FORMAT:
            raise ValueError(
                f"{CONFIG_FILE} format={version!r} is not supported; expected {_CONFIG_FORMAT}"
            )
        fields = {f.name for f in dataclasses.fields(TokenizerConfig)}
        if set(payload) != fields:
            raise ValueError(f"{CONFIG_FILE} keys {sorted(payload)} do not match {sorted(fields)}")
        payload["stop_ids"] = tuple(payload["stop_ids"])
        return cls(
            tokenizers.Tokenizer.from_file(str(path / TOKENIZER_FILE)), TokenizerConfig(**payload)
        )


class StreamDecoder:
    """Turns generated ids, one at a time, into text pieces that are safe to print.

    A piece is held back while it ends in an incomplete UTF-8 character (a byte-level or
    byte-fallback token can carry part of one), so the concatenation of every `push` and the
    final `flush` equals `tokenizer.decode(all_ids)`. Each step decodes only the ids since the
    last emitted piece plus one piece of context, so the cost does not grow with the stream.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window: ids already emitted, decoded for context
        self._read = 0  # end of the emitted ids

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.backend.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Adds one id; returns the newly completed text (empty while a character is incomplete)."""
        self._ids.extend(self._tokenizer._check_ids([token_id]))
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        complete = not text.endswith("\ufffd") and text.startswith(prefix_text)
        if complete and len(text) > len(prefix_text):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Ends the stream: returns any held-back text (incomplete bytes as U+FFFD) and resets."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(prefix_text) :]
