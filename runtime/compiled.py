"""A model compiled under a pass pipeline: generate, stream, score, graph.

Graphs are captured per shape bucket (batch, prefill length, cache length) and
the pass pipeline runs on each capture; weight transforms are memoized, so a new
bucket costs a trace and an XLA compile, never a second quantization.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallax import cpu_kernels as _cpu_kernels  # registers the CPU kernel lowerings
from pallax import pallas_kernels as _pallas_kernels  # registers the tpu / cuda lowerings
from pallax.ir.graph import Graph, StepSpec, capture
from pallax.ir.manager import run_passes
from pallax.ir.printer import format_graph
from pallax.ir.qformat import QuantizedWeight
from pallax.passes.quantize_weights import use_packed_weights
from pallax.runtime import generation as gen
from pallax.runtime.requests import GenerationResult, Request, build_requests, finish
from pallax.runtime.sampling import pack

del _cpu_kernels, _pallas_kernels

PREFILL_CHUNK = 512
MIN_PREFILL = 16
CACHE_ROUND = 256


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class Buckets:
    batch: int
    prefill: int  # tokens per prefill call
    chunks: int  # prefill calls
    cache: int  # S


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


class CompiledModel:
    """Compiled generation for one model and one pass pipeline."""

    def __init__(self, model, passes=()):
        self.model = model
        self.passes = tuple(passes)
        self._graphs: dict = {}
        self._fns: dict = {}
        self.capture_seconds = 0.0  # tracing + passes; XLA compiles lazily on first call
        self.last_timings: Timings | None = None  # of the last generate
        self._display: Graph | None = None

    # ------------------------------------------------------------------ graphs
    @property
    def config(self):
        return self.model.config

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def _capture(self, specs) -> Graph:
        meta = {
            "arch": self.config.arch,
            "dtype": "float32",
            "model": self.config.name,
            # for passes that calibrate on text (quantize_weights with GPTQ or outliers)
            "forward": self.model.forward,
            "tokenizer": self.tokenizer,
            "vocab_size": self.config.vocab_size,
            "context_length": self.config.context_length,
        }
        weights = self.model.weights
        packed = {k for k, v in weights.items() if isinstance(v, QuantizedWeight)}
        if packed:  # kept quantized from the file: trace against float stand-ins, then swap
            stand_ins = {
                k: jax.ShapeDtypeStruct(v.shape, jnp.float32) if k in packed else v
                for k, v in weights.items()
            }
            graph = capture(self.model.forward, stand_ins, self.model.cache_layout(), specs, meta)
            graph = use_packed_weights(graph, weights, "kept from " + _kinds(weights))
        else:
            graph = capture(self.model.forward, weights, self.model.cache_layout(), specs, meta)
        return run_passes(graph, self.passes)

    def pipeline_graph(self) -> Graph:
        """The graph at a small canonical shape (B=1, prefill 16, cache 256), after passes."""
        if self._display is None:
            s = min(CACHE_ROUND, self.config.context_length)
            self._display = self._capture(
                [StepSpec("prefill", 1, MIN_PREFILL, s), StepSpec("decode", 1, 1, s)]
            )
        return self._display

    def graph(self, step: str = "decode") -> str:
        """The traced graph of `step` ("prefill" or "decode") as text, semantic ops by name."""
        if step not in ("prefill", "decode"):
            raise ValueError(f"step={step!r} must be 'prefill' or 'decode'")
        return format_graph(self.pipeline_graph(), step)

    def memory_report(self, budget_bytes: int | None = None, context: int | None = None) -> dict:
        """Weight bytes, KV bytes per token (all layers, one sequence) and fixed KV bytes
        per sequence (a KIVI residual window, a fixed-size cache), after the passes.

        With `budget_bytes` (the device memory for weights + KV cache), also the
        largest batch at `context` tokens (default: the model's context length) and the
        largest batch x context (tokens in flight) that fit; activations are not counted.
        """
        g = self.pipeline_graph()
        report = {
            "weight_bytes": g.weight_bytes(),
            "kv_bytes_per_token": g.cache.bytes_per_token(),
            "kv_fixed_bytes_per_sequence": g.cache.fixed_bytes(),
            "kv_layout": g.cache.kind,
        }
        if budget_bytes is None:
            if context is not None:
                raise ValueError("memory_report: context= needs budget_bytes=")
            return report
        for name, value in (("budget_bytes", budget_bytes), ("context", context)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"memory_report: {name}={value!r} must be a positive integer")
        context = self.config.context_length if context is None else context
        free = budget_bytes - report["weight_bytes"]
        per_seq = context * report["kv_bytes_per_token"] + report["kv_fixed_bytes_per_sequence"]
        batch = max(0, int(free // per_seq)) if free > 0 else 0
        report.update(
            budget_bytes=budget_bytes,
            context=context,
            max_batch=batch,
            max_batch_x_context=batch * context,
        )
        return report

    @property
    def weights(self):
        return self.pipeline_graph().weights

    def save(self, path, *, overwrite: bool = False) -> None:
        """Write the weights after the pass pipeline, config, tokenizer and passes to the
        directory `path`, a pallax checkpoint that `pallax.load(path)` reads back."""
        from pallax.runtime import checkpoint

        checkpoint.save_checkpoint(self, path, overwrite=overwrite)

    def _timed(self, key, build):
        fn = self._fns.get(key)
        if fn is None:
            t0 = time.perf_counter()
            fn = build()
            self.capture_seconds += time.perf_counter() - t0
            self._fns[key] = fn
        return fn

    def _gen_fns(self, b: Buckets):
        key = ("gen", b)

        def build():
            graph = self._capture(
                [
                    StepSpec("prefill", b.batch, b.prefill, b.cache),
                    StepSpec("decode", b.batch, 1, b.cache),
                ]
            )
            return graph, gen.make_prefill(graph), gen.make_decode_loop(graph)

        return self._timed(key, build)

    # ----------------------------------------------------------------- buckets
    @property
    def unbounded_context(self) -> bool:
        """Whether a pass (attention sinks) lets generation run past the context length
        with a fixed-size cache."""
        return any(getattr(p, "unbounded_context", False) for p in self.passes)

    def _buckets(self, reqs: Sequence[Request]) -> Buckets:
        ctx = self.config.context_length
        longest = max(len(r.prompt_ids) for r in reqs)
        prefill = min(max(MIN_PREFILL, _pow2(longest)), PREFILL_CHUNK, ctx)
        chunks = -(-longest // prefill)
        need = max(len(r.prompt_ids) + r.max_new_tokens for r in reqs)
        # S also sizes the buffer of generated tokens; a fixed-size cache ignores it.
        cap = None if self.unbounded_context else ctx
        cache = _round_up(max(need, chunks * prefill), CACHE_ROUND)
        cache = cache if cap is None else min(cache, cap)
        cache = max(cache, chunks * prefill)
        return Buckets(batch=_pow2(len(reqs)), prefill=prefill, chunks=chunks, cache=cache)

    # ---------------------------------------------------------------- generate
    def generate(self, prompts, max_new_tokens: int = 64, **kwargs) -> list[GenerationResult]:
        """Generate for a batch of prompts (strings or token-id lists); one result each.

        Sampling arguments (temperature, top_k, top_p, min_p, seed, stop,
        stop_token_ids, ignore_eos, max_new_tokens) are scalars or one per prompt.
        """
        reqs = build_requests(self, prompts, max_new_tokens=max_new_tokens, **kwargs)
        t0 = time.perf_counter()
        state, loop, args = self._start(reqs)
        jax.block_until_ready(state.token)
        t1 = time.perf_counter()
        steps = max(r.max_new_tokens for r in reqs) - 1
        if steps > 0:
            state = loop(self.weights, state, *args, jnp.int32(steps))
        out, count, done_steps = jax.device_get((state.out, state.count, state.step))
        decode_s = time.perf_counter() - t1
        self.last_timings = Timings(t1 - t0, decode_s, int(done_steps) - 1, len(reqs))
        return [finish(self.tokenizer, r, out[i, : count[i]]) for i, r in enumerate(reqs)]

    def stream(self, prompt, max_new_tokens: int = 64, **kwargs) -> Iterator[str]:
        """Yield the continuation of one prompt piece by piece as tokens are decoded."""
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
            tok, done, count = jax.device_get((state.token[0], state.done[0], state.count[0]))
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

    def _loop_args(self, reqs, b: Buckets):
        return (
            pack([r.sampling for r in reqs], b.batch),
            _stop_array(reqs, b.batch),
            jnp.asarray([r.max_new_tokens for r in reqs] + [1] * (b.batch - len(reqs)), jnp.int32),
        )

    def _start(self, reqs: Sequence[Request]):
        """Prefill (in chunks if long), sample the first token; (state, decode loop, loop args)."""
        b = self._buckets(reqs)
        graph, prefill, loop = self._gen_fns(b)
        lens = np.array([len(r.prompt_ids) for r in reqs] + [1] * (b.batch - len(reqs)), np.int32)
        total = b.chunks * b.prefill
        tokens = np.zeros((b.batch, total), np.int32)
        for i, r in enumerate(reqs):
            tokens[i, : len(r.prompt_ids)] = r.prompt_ids
        cache = graph.cache.allocate(b.batch, b.cache)
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

        ids = encode_prompt(self, text)
        if len(ids) < 2:
            raise ValueError(f"score needs at least 2 tokens, the text has {len(ids)}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
        n = len(ids)
        ctx = self.config.context_length
        if n > ctx and not self.unbounded_context:
            raise ValueError(f"text has {n} tokens; the context length is {ctx}")
        t = min(_pow2(chunk_size), _pow2(n))
        s = max(_round_up(n, CACHE_ROUND), _round_up(n, t))
        if not self.unbounded_context:
            s = min(s, _round_up(ctx, t))
        fn = self._timed(("score", t, s), lambda: self._score_fn(t, s))
        graph, chunk = fn
        cache = graph.cache.allocate(1, s)
        padded = np.zeros(_round_up(n, t) + 1, np.int32)
        padded[:n] = ids
        out = []
        for start in range(0, n - 1, t):
            toks = jnp.asarray(padded[None, start : start + t])
            targets = jnp.asarray(padded[None, start + 1 : start + t + 1])
            logp, cache = chunk(self.weights, cache, toks, jnp.asarray([start], jnp.int32), targets)
            out.append(np.asarray(logp[0]))
        return np.concatenate(out)[: n - 1]

    def _score_fn(self, t, s):
        graph = self._capture([StepSpec("chunk", 1, t, s)])
        return graph, gen.make_score_chunk(graph)


def _kinds(weights) -> str:
    kinds = sorted({v.describe() for v in weights.values() if isinstance(v, QuantizedWeight)})
    return "; ".join(kinds)


def _stop_array(reqs, batch):
    width = max(1, max(len(r.stop_ids) for r in reqs))
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


def compile(model, passes=None) -> CompiledModel:  # noqa: A001 - the public API name
    """Compile `model` under `passes` (a list of pass objects or names; [] is valid).

    A model loaded from a pallax checkpoint remembers the passes its weights went through
    (`model.passes`; () for other models): they always run first, so `passes=None` compiles
    it as it was saved and explicit `passes` run after them.
    """
    from pallax.model.loaded import Model
    from pallax.passes import resolve_passes

    if not isinstance(model, Model):
        raise TypeError(f"compile() takes a pallax Model (from pallax.load), got {model!r:.80}")
    from pallax.ir.manager import check_order, initial_facts
    from pallax.passes.evict_kv import check_pipeline

    pipeline = model.passes + resolve_passes(passes)
    # Refused before any capture: an order the passes' declared facts rule out, and KV
    # passes that cannot compose.
    packed = any(isinstance(w, QuantizedWeight) for w in model.weights.values())
    check_order(pipeline, initial_facts(packed_weights=packed))
    check_pipeline(pipeline)
    return CompiledModel(model, pipeline)
