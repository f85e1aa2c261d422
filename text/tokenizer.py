"""Text <-> token ids (a `tokenizers` pipeline plus what it lacks: special ids, BOS/EOS,
the chat template), saved as tokenizer.json + pallax_tokenizer.json. Imports nothing of
pallax outside `pallax.text`: artifacts load it without the model code.

The pipeline for a GGUF model is rebuilt from its own tokenizer metadata (model/tokenizer_gguf.py).

A GGUF has no tokenizer.json, only llama.cpp's `tokenizer.ggml.*` keys (vocabulary, token types,
merges or scores, special ids). This rebuilds a `tokenizers` pipeline from them, so pallax needs
neither transformers nor a hub repository. Supported `tokenizer.ggml.model`s: "gpt2" (byte-level
BPE, split as `tokenizer.ggml.pre` says) and "llama" (SentencePiece-style BPE with byte fallback).
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers

from pallax.text.chat_template import compile_chat_template

SUPPORTED_MODELS = ("gpt2", "llama")
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "pallax_tokenizer.json"
_CONFIG_FORMAT = 1


# Tokens that end a turn in common chat formats. They stop generation next to EOS.
_END_OF_TEXT = "<|endoftext|>"
_END_OF_TURN_TOKENS = (
    "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
    "<|end_of_turn|>", "<|return|>", "<|call|>", "<EOT>",
)  # fmt: skip


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


def end_of_turn_ids(token_to_id: Callable[[str], int | None], template: str | None) -> set[int]:
    """`<|endoftext|>` and the known end-of-turn tokens the chat template uses (all of them
    when there is no template), as far as the vocabulary has them."""
    tokens = [t for t in _END_OF_TURN_TOKENS if template is None or t in template]
    ids = {token_to_id(t) for t in (*tokens, _END_OF_TEXT)}
    return {i for i in ids if i is not None}


class Tokenizer:
    """Text <-> token ids for one model, from `tokenizer_from_gguf` or `Tokenizer.load`."""

    def __init__(self, backend: tokenizers.Tokenizer, config: TokenizerConfig):
        self._backend = backend
        self._config = config
        self._template: jinja2.Template | None = None

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
            self._template = compile_chat_template(self._config.chat_template)
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
