"""Generation on the host side, shared by compiled models and exported artifacts: requests
in, prefill chunks and the on-device decode loop driven, stop strings applied, text out.

A subclass provides the compiled pieces for a shape bucket:

- `_buckets(reqs)`: the bucket (batch, prefill, chunks, cache) for these requests;
- `_gen_fns(bucket)`: (alloc() -> an empty cache, prefill, decode loop);
- `_score_plan(n, chunk_size)`: (chunk T, cache S) to score n tokens;
- `_score_fns(t, s)`: (alloc() -> an empty cache, score chunk);

and `config` (context_length, vocab_size), `tokenizer`, `weights`, `unbounded_context`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallax.runtime import generation as gen
from pallax.runtime.requests import (
    GenerationResult,
    Request,
    build_requests,
    check_sampling_kwargs,
    finish,
)
from pallax.runtime.sampling import pack
from pallax.sharding.distributed import to_host


@dataclasses.dataclass(frozen=True)
class Timings:
    """Wall-clock seconds of the last `generate`: prefill (every chunk and the first
    sampled token, compiles included) and the decode loop, which ran `decode_steps`
    steps for each of `batch` rows (padding rows of the batch bucket not counted)."""

    prefill_s: float
    decode_s: float
    decode_steps: int
    batch: int

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch * self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


class Generator:
    """`generate`, `stream` and `score` over the compiled pieces a subclass provides."""

    last_timings: Timings | None = None  # of the last generate
    _stop_width: int | None = None  # stop ids per row: fixed in an exported decode loop

    def _check_runnable(self) -> None:
        """Refuse generation before anything is compiled (a subclass's reasons)."""

    def generate(self, prompts, max_new_tokens: int = 64, **kwargs) -> list[GenerationResult]:
        """Generate for a batch of prompts (strings or token-id lists); one result each.

        Sampling arguments (temperature, top_k, top_p, min_p, seed, stop,
        stop_token_ids, ignore_eos, max_new_tokens) are scalars or one per prompt.
        """
        check_sampling_kwargs("generate", kwargs)
        self._check_runnable()
        reqs = build_requests(self, prompts, max_new_tokens=max_new_tokens, **kwargs)
        t0 = time.perf_counter()
        state, loop, args = self._start(reqs)
        jax.block_until_ready(state.token)
        t1 = time.perf_counter()
        steps = max(r.max_new_tokens for r in reqs) - 1
        if steps > 0:
            state = loop(self.weights, state, *args, jnp.int32(steps))
        out, count, done_steps = to_host((state.out, state.count, state.step))
        decode_s = time.perf_counter() - t1
        self.last_timings = Timings(t1 - t0, decode_s, int(done_steps) - 1, len(reqs))
        return [finish(self.tokenizer, r, out[i, : count[i]]) for i, r in enumerate(reqs)]

    def stream(self, prompt, max_new_tokens: int = 64, **kwargs) -> Iterator[str]:
        """Yield the continuation of one prompt piece by piece as tokens are decoded."""
        check_sampling_kwargs("stream", kwargs)
        self._check_runnable()
        if not isinstance(prompt, (str, list, tuple)):
            raise ValueError(f"stream takes one prompt (a string or token ids), got {type(prompt)}")
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (str, list)):
            raise ValueError("stream takes one prompt; use generate for a batch")
        (req,) = build_requests(self, [prompt], max_new_tokens=max_new_tokens, **kwargs)
        return self._stream(req)

    def _stream(self, req: Request) -> Iterator[str]:
        from pallax.text.tokenizer import StreamDecoder

        state, loop, args = self._start([req])
        decoder = StreamDecoder(self.tokenizer, skip_special_tokens=True)
        emitted, text, ids = "", "", []
        while True:
            tok, done, count = (a[0] for a in to_host((state.token, state.done, state.count)))
            ids.append(int(tok))
            if int(tok) not in req.stop_ids:
                text += decoder.push(int(tok))
            cut = _find_stop(text, req.stop, len(emitted))
            if cut is not None:
                if cut > len(emitted):
                    yield text[len(emitted) : cut]
                return
            safe = len(text) - _held_back(text, req.stop)
            if safe > len(emitted):
                yield text[len(emitted) : safe]
                emitted = text[:safe]
            if done or count >= req.max_new_tokens:
                break
            state = loop(self.weights, state, *args, jnp.int32(1))
        text += decoder.flush()
        if len(text) > len(emitted):
            yield text[len(emitted) :]

    def _loop_args(self, reqs, b):
        return (
            pack([r.sampling for r in reqs], b.batch),
            _stop_array(reqs, b.batch, self._stop_width),
            jnp.asarray([r.max_new_tokens for r in reqs] + [1] * (b.batch - len(reqs)), jnp.int32),
        )

    def _start(self, reqs: Sequence[Request]):
        """Prefill (in chunks if long), sample the first token; (state, decode loop, loop args)."""
        b = self._buckets(reqs)
        alloc, prefill, loop = self._gen_fns(b)
        lens = np.array([len(r.prompt_ids) for r in reqs] + [1] * (b.batch - len(reqs)), np.int32)
        total = b.chunks * b.prefill
        tokens = np.zeros((b.batch, total), np.int32)
        for i, r in enumerate(reqs):
            tokens[i, : len(r.prompt_ids)] = r.prompt_ids
        cache = alloc()
        logits = None
        for c in range(b.chunks):
            start = c * b.prefill
            # -1: the row's prompt ended before this chunk (its logits are not used; a
            # compressed KV cache must not take its padding).
            last = np.clip(lens - 1 - start, -1, b.prefill - 1).astype(np.int32)
            chunk_logits, cache = prefill(
                self.weights,
                cache,
                jnp.asarray(tokens[:, start : start + b.prefill]),
                jnp.full((b.batch,), start, jnp.int32),
                jnp.asarray(last),
            )
            mine = jnp.asarray((lens - 1 >= start) & (lens - 1 < start + b.prefill))
            logits = (
                chunk_logits if logits is None else jnp.where(mine[:, None], chunk_logits, logits)
            )
        args = self._loop_args(reqs, b)
        first, done = gen.first_token(logits, *args)
        state = gen.init_state(cache, first, done, jnp.asarray(lens), b.cache)
        return state, loop, args

    # ------------------------------------------------------------------- score
    def score(self, text, *, chunk_size: int = 128) -> np.ndarray:
        """log p(token_i | tokens_<i) for i = 1..n-1, run through the compiled graph and cache.

        The text is fed in chunks through the KV cache, so every token attends to
        the cached history exactly as in generation.
        """
        from pallax.runtime.requests import encode_prompt

        self._check_runnable()
        ids = encode_prompt(self, text)
        if len(ids) < 2:
            raise ValueError(f"score needs at least 2 tokens, the text has {len(ids)}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
        t, s = self._score_plan(len(ids), chunk_size)
        alloc, chunk = self._score_fns(t, s)
        cache = alloc()
        n = len(ids)
        padded = np.zeros(-(-n // t) * t + 1, np.int32)
        padded[:n] = ids
        out = []
        for start in range(0, n - 1, t):
            toks = jnp.asarray(padded[None, start : start + t])
            targets = jnp.asarray(padded[None, start + 1 : start + t + 1])
            logp, cache = chunk(self.weights, cache, toks, jnp.asarray([start], jnp.int32), targets)
            out.append(to_host(logp)[0])
        return np.concatenate(out)[: n - 1]


def _stop_array(reqs, batch, width=None):
    need = max(1, max(len(r.stop_ids) for r in reqs))
    if width is not None and need > width:
        raise ValueError(
            f"a request has {need} stop token ids; this artifact's decode loop takes {width}"
        )
    width = need if width is None else width
    arr = np.full((batch, width), -1, np.int32)
    for i, r in enumerate(reqs):
        ids = sorted(r.stop_ids)
        arr[i, : len(ids)] = ids
    return jnp.asarray(arr)


def _find_stop(text: str, stops, start: int):
    best = None
    for s in stops:
        i = text.find(s, max(0, start - len(s)))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _held_back(text: str, stops) -> int:
    """Characters to hold back because they may begin a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold
