"""Generation requests: validation at the API boundary, and turning tokens into results."""

from __future__ import annotations

import dataclasses

import numpy as np

from pallax.runtime.sampling import SamplingParams
from pallax.text.tokenizer import check_text

FINISH_REASONS = ("stop", "length", "cancelled")  # cancelled: an engine request


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_token_ids: list[int]


@dataclasses.dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset[int]  # token ids that end generation (eos unless ignore_eos)
    stop: tuple[str, ...]  # stop strings
    ignore_eos: bool


def encode_prompt(compiled, prompt, index: int | None = None) -> list[int]:
    """Token ids of one prompt (a string or a sequence of token ids), checked strictly:
    nothing is coerced (a float, a string or a bool is not a token id)."""
    tok = compiled.tokenizer
    what = "prompt" if index is None else f"prompt {index}"
    if isinstance(prompt, str):
        if prompt == "":
            raise ValueError(f"{what} is empty; give at least one character or token")
        check_text(prompt, what)
        ids = tok.encode(prompt)
    elif isinstance(prompt, np.ndarray) and prompt.ndim != 1:
        raise ValueError(f"{what} token array has shape {prompt.shape}; expected one dimension")
    elif isinstance(prompt, (list, tuple, np.ndarray)):
        ids = []
        for j, i in enumerate(prompt):
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise TypeError(
                    f"{what} element {j} is {i!r} ({type(i).__name__}); token ids must be "
                    "integers (a prompt is a string or a list of int token ids)"
                )
            ids.append(int(i))
        bad = [i for i in ids if not 0 <= i < compiled.config.vocab_size]
        if bad:
            raise ValueError(
                f"{what} token ids {bad[:5]} are outside [0, {compiled.config.vocab_size})"
            )
    else:
        raise TypeError(
            f"{what} must be a string or a list of token ids, got {type(prompt).__name__}"
        )
    if not ids:
        raise ValueError(f"{what} {prompt!r} encodes to no tokens")
    return list(ids)


def _per_prompt(name, value, n):
    if isinstance(value, (list, tuple)) and name not in ("stop", "stop_token_ids"):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} prompts")
        return list(value)
    if name in ("stop", "stop_token_ids") and isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, (list, tuple)) for v in value):
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} lists for {n} prompts")
            return list(value)
    return [value] * n


SAMPLING_ARGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
                 "stop_token_ids", "ignore_eos")  # fmt: skip


class UnknownArgumentError(TypeError, ValueError):
    """A keyword a public method does not take (a TypeError, as Python raises for one, and a
    ValueError, as pallax raises for bad input)."""


def check_sampling_kwargs(method: str, kwargs: dict) -> None:
    """Refuse a keyword that is not a sampling argument, naming the method, the keyword
    and the closest allowed one."""
    import difflib

    for key in kwargs:
        if key not in SAMPLING_ARGS:
            close = difflib.get_close_matches(str(key), SAMPLING_ARGS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UnknownArgumentError(
                f"{method}() got an unknown keyword argument {key!r}; {hint}"
                f"its sampling arguments are {', '.join(SAMPLING_ARGS)}"
            )


def build_requests(
    compiled,
    prompts,
    *,
    max_new_tokens=64,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    seed=None,
    stop=None,
    stop_token_ids=None,
    ignore_eos=False,
) -> list[Request]:
    """Validate everything before anything compiles; one Request per prompt."""
    if isinstance(prompts, np.ndarray):  # one prompt [T] or a batch of equal lengths [B, T]
        prompts = [prompts] if prompts.ndim == 1 else list(prompts)
    if isinstance(prompts, str) or (
        isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], (int, np.integer))
    ):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(
            f"prompts must be a non-empty list of strings or token lists, got {prompts!r}"
        )
    n = len(prompts)
    ctx = compiled.config.context_length
    args = {
        k: _per_prompt(k, v, n)
        for k, v in dict(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            min_p=min_p, seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
        ).items()
    }  # fmt: skip
    reqs = []
    for i, prompt in enumerate(prompts):
        ids = encode_prompt(compiled, prompt, i)
        m = args["max_new_tokens"][i]
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"max_new_tokens={m!r} must be an integer >= 1")
        if len(ids) >= ctx:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; the context length is {ctx}")
        if len(ids) + m > ctx and not getattr(compiled, "unbounded_context", False):
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens and max_new_tokens={m}: "
                f"{len(ids) + m} exceeds the context length {ctx}"
            )
        sampling = SamplingParams(
            temperature=args["temperature"][i],
            top_k=args["top_k"][i],
            top_p=args["top_p"][i],
            min_p=args["min_p"][i],
            seed=args["seed"][i],
        )
        stop_strings = _stop_strings(args["stop"][i])
        user_ids = _stop_ids(args["stop_token_ids"][i], compiled.config.vocab_size)
        ignore = args["ignore_eos"][i]
        if not isinstance(ignore, (bool, np.bool_)):
            raise ValueError(f"ignore_eos={ignore!r} must be True or False")
        ignore = bool(ignore)
        eos = frozenset() if ignore else frozenset(compiled.tokenizer.stop_ids)
        reqs.append(Request(ids, int(m), sampling, eos | user_ids, stop_strings, ignore))
    return reqs


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop={stop!r} must be a non-empty string or a list of them")
    for j, s in enumerate(stop):
        check_text(s, f"stop string {j}")
    return tuple(stop)


def _stop_ids(ids, vocab) -> frozenset[int]:
    if ids is None:
        return frozenset()
    if isinstance(ids, (int, np.integer)):
        ids = [ids]
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < vocab:
            raise ValueError(f"stop_token_ids value {i!r} must be a token id in [0, {vocab})")
        out.append(int(i))
    return frozenset(out)


def finish(tokenizer, req: Request, ids) -> GenerationResult:
    """Text, ids and finish reason for one row; stop strings cut text and ids."""
    ids = [int(i) for i in ids]
    reason = "length"
    if ids and ids[-1] in req.stop_ids:
        reason = "stop"
        body = ids[:-1]
    else:
        body = ids
    text = tokenizer.decode(body, skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=None)
    if cut is not None:
        text = text[:cut]
        reason = "stop"
        keep = len(body)
        for k in range(1, len(body) + 1):
            if len(tokenizer.decode(body[:k], skip_special_tokens=True)) >= cut + 1:
                keep = k
                break
        ids = body[:keep]
    return GenerationResult(text, ids, reason, list(req.prompt_ids))
