"""The serving engine: requests join and leave a running batch at every step.

`Engine(compiled, max_batch=8, token_budget=256, max_len=1024)` (a CompiledModel, or an
artifact exported with `engine=`: runtime/artifact_engine.py) keeps a KV cache of
`max_batch` request slots of `max_len` tokens and runs its loop in its own thread. Each
step (SARATHI's chunked prefill with decode piggybacking):

1. cancelled requests leave; waiting ones take free slots in arrival order, with the
   pages of their prompt the prefix cache holds (`prefix_cache` tokens; runtime/
   prefix_cache.py);
2. every decoding request takes one token of the step's `token_budget`, and prompt
   chunks fill the rest, so a long prompt never stalls running requests for a whole
   prefill;
3. one decode step runs for every decoding slot, dispatched before the previous step's
   tokens are read (`Engine._decode`); with `speculate=K`, one verification of K tokens
   drafted per request instead: by prompt lookup, or by a smaller model with the same
   tokenizer (`draft=`, runtime/engine_draft.py).

`submit(prompt, **sampling)` returns a `RequestHandle` that streams text (a sync iterator
and `async for`), gives the `GenerationResult` and can be cancelled; each request has
its own sampling parameters, seed, stop strings and length. `max_waiting` bounds the
queue (then `submit` raises `EngineBusy`). A request's tokens are those `generate`
gives it alone (docs/DESIGN.md, "Serving engine").
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time

import jax.numpy as jnp
import numpy as np

from pallax.runtime import kv_pages as paging
from pallax.runtime import page_pool
from pallax.runtime.engine_handle import Counters, EngineBusy, EngineClosed, Live, RequestHandle
from pallax.runtime.engine_steps import (
    MAX_CHUNK,
    MIN_CHUNK,
    EngineShape,
    chunk_args,
    pack_slots,
    positive_int,
    pow2,
)
from pallax.runtime.generator import _find_stop, _held_back
from pallax.runtime.requests import build_requests, check_sampling_kwargs, finish

PREFIX_PAGE = 64  # tokens per page of the prefix cache


def _is_compiled(obj) -> bool:
    """Whether `obj` is a CompiledModel (whose module imports the model code, which an
    engine on an artifact never does)."""
    from pallax.runtime.compiled import CompiledModel

    return isinstance(obj, CompiledModel)


class Engine:
    """Continuous batching over a compiled model (see the module docstring)."""

    def __init__(self, compiled, *, max_batch: int | None = None,
                 token_budget: int | None = None, max_len: int | None = None,
                 max_waiting: int | None = None, prefix_cache: int | None = None,
                 speculate: int | None = None, draft=None, kv_pages: int | None = None,
                 page_size: int | None = None):  # fmt: skip
        from pallax.runtime.artifact import Artifact

        limits = {"max_batch": max_batch, "token_budget": token_budget, "max_len": max_len,
                  "speculate": speculate}  # fmt: skip
        if isinstance(compiled, Artifact):  # the shapes its engine modules were exported for
            shape = compiled.engine_shape(**limits)
        elif _is_compiled(compiled):
            compiled._check_runnable()
            defaults = {"max_batch": 8, "token_budget": 256, "speculate": 0}
            limits = {k: defaults.get(k) if v is None else v for k, v in limits.items()}
            shape = EngineShape.plan(
                **limits, context=compiled.config.context_length,
                min_batch=compiled.min_batch, data=compiled.data_parallel,
            )  # fmt: skip
        else:
            raise TypeError(
                "Engine takes a CompiledModel (pallax.compile(...)) or an Artifact "
                f"(pallax.load_artifact(...)), got {type(compiled).__name__}"
            )
        max_waiting = None if max_waiting is None else positive_int("max_waiting", max_waiting, 0)
        self.compiled, self.max_waiting, self.shape = compiled, max_waiting, shape
        if prefix_cache is None:  # half the slots' tokens again, in whole pages
            prefix_cache = shape.max_batch * shape.max_len // 2
        self._prefix_tokens = positive_int("prefix_cache", prefix_cache, 0)
        self._prefix = None  # a PrefixCache once the cache layout is known (if it has one)
        self._spec_ok = False  # whether the cache layout lets rejected drafts be overwritten
        self.max_batch, self.token_budget = shape.max_batch, shape.token_budget
        self.max_len, self.speculate = shape.max_len, shape.speculate
        self._rows, self._chunk_rows = shape.rows, shape.chunk_rows
        self._cache_len = shape.cache_len
        self._kv = None  # a page_pool.PagedKV: the pages and block tables of a paged cache
        paged = None
        if kv_pages is not None or page_size is not None:
            pages, page, longest, per_slot = paging.plan(kv_pages, page_size, shape, compiled)
            per_row = shape.cache_len // page
            self._kv = page_pool.PagedKV(pages, page, longest, self._rows, per_row, per_slot)
            paged = (pages, page)
        self._steps = compiled.slot_steps(shape, paged=paged)
        self._draft = None
        if draft is not None:  # checked here, before the loop runs
            from pallax.runtime import prefix_cache
            from pallax.runtime.engine_draft import DraftModel

            if self.speculate < 1:
                raise ValueError("draft= needs speculate=K >= 1 drafted tokens per step")
            self._draft = DraftModel(draft, compiled, self._rows, self._cache_len, self.speculate)
            if not prefix_cache.addressed(self._steps.decode()[0]):
                raise ValueError(
                    "speculative decoding needs a cache addressed by position on one device "
                    "(dense or int8, unsharded); this model's cannot take drafts back"
                )
        self._cv = threading.Condition()
        self._waiting: collections.deque[Live] = collections.deque()
        self._running: list[Live] = []
        self._free = list(range(self.max_batch))[::-1]
        self._closing = False
        self._error: BaseException | None = None
        self._sampling = None  # packed per-slot parameters, rebuilt when slots change
        self.metrics = Counters()
        self._cache = None
        self._flight = None  # (requests, their next tokens on the device): a step in flight
        self._thread = threading.Thread(target=self._main, name="pallax-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    def submit(self, prompt, max_new_tokens: int = 64, **sampling) -> RequestHandle:
        """Queue one prompt (a string or token ids); returns its handle at once.

        Sampling arguments as `generate` (temperature, top_k, top_p, min_p, seed, stop,
        stop_token_ids, ignore_eos); a request without a seed gets one here."""
        check_sampling_kwargs("submit", sampling)
        self._check_open()
        if not isinstance(prompt, (str, list, tuple, np.ndarray)) or (
            isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (str, list))
        ):
            raise ValueError(f"submit takes one prompt (a string or token ids), got {prompt!r:.80}")
        (req,) = build_requests(self.compiled, [prompt], max_new_tokens=max_new_tokens, **sampling)
        need = len(req.prompt_ids) + req.max_new_tokens
        if need > self.max_len:
            raise ValueError(
                f"the prompt has {len(req.prompt_ids)} tokens and max_new_tokens="
                f"{req.max_new_tokens}: {need} exceeds this engine's max_len={self.max_len}"
            )
        if req.sampling.seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**31))
            req = dataclasses.replace(req, sampling=dataclasses.replace(req.sampling, seed=seed))
        from pallax.text.tokenizer import StreamDecoder

        handle = RequestHandle(self, req)
        live = Live(req, handle, StreamDecoder(self.compiled.tokenizer, skip_special_tokens=True))
        with self._cv:
            self._check_open()
            queued = len(self._waiting) - len(self._free)  # beyond the free slots
            if self.max_waiting is not None and queued >= self.max_waiting:
                raise EngineBusy(
                    f"{queued} requests are waiting for a slot (max_waiting="
                    f"{self.max_waiting}); try again later"
                )
            self._waiting.append(live)
            self.metrics.add("submitted", 1)
            self._cv.notify()
        return handle

    def _check_open(self) -> None:
        if self._error is not None:
            raise EngineClosed(f"the engine stopped on an error: {self._error!r}")
        if self._closing:
            raise EngineClosed("the engine is closed; it takes no more requests")

    def stats(self) -> dict:
        """Counters (submitted, finished, cancelled, steps, prompt_tokens, generated_tokens,
        prefill_chunks, prefix_hit_tokens, drafted_tokens, accepted_tokens: each once it
        counts something) and the requests running and waiting now."""
        live = {"running": len(self._running), "waiting": len(self._waiting)}
        if self._kv is not None:
            live |= {"kv_pages": self._kv.pages, "kv_pages_used": self._kv.used()}
        return self.metrics.snapshot() | live

    def close(self) -> None:
        """Stop the loop; requests still waiting or running end as "cancelled"."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _main(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._closing or self._waiting or self._running):
                        self._cv.wait()
                    if self._closing:
                        break
                self._step()
        except BaseException as e:  # noqa: BLE001 - handed to every waiting caller
            with self._cv:
                self._error = e
            for live in list(self._running) + list(self._waiting):
                live.handle._fail(e)
            self._running.clear()
            self._waiting.clear()
            return
        for live in list(self._running) + list(self._waiting):
            self._end(live, "cancelled")
        self._waiting.clear()

    def _step(self) -> None:
        with self._cv:
            for live in [x for x in self._waiting if x.handle.cancelled]:
                self._waiting.remove(live)
                self._end(live, "cancelled")
            for live in [x for x in self._running if x.handle.cancelled]:
                self._end(live, "cancelled")
            admitted = []
            while self._free and self._waiting:
                if self._kv is not None and not self._kv.fits(self._waiting[0]):
                    break  # its pages are not free yet: it waits at the head of the queue
                live = self._waiting.popleft()
                live.slot = self._free.pop()
                if self._kv is not None:
                    live.prefilled += self._kv.admit(live, self._prefix_tokens > 0)
                self._running.append(live)
                admitted.append(live)
                self._sampling = None
        if not self._running:
            return
        if self._cache is None:
            self._start_cache()
        for live in admitted if self._kv is not None else ():
            if live.saved is not None:  # preempted: its KV goes back to its new pages
                pool = self._kv.restore(self._cache["pool"], live.slot, live.saved)
                self._cache, live.saved = {**self._cache, "pool": pool}, None
            else:
                self.metrics.add("prefix_hit_tokens", live.prefilled)
        for live in admitted if self._prefix is not None else ():
            pages = self._prefix.lookup(live.req.prompt_ids)
            if pages:  # the prompt starts with cached pages: copy them, prefill the rest
                self._cache = self._prefix.load(self._cache, live.slot, pages)
                live.prefilled = len(pages) * self._prefix.page
                self.metrics.add("prefix_hit_tokens", live.prefilled)
        self.metrics.add("steps", 1)
        for live in [x for x in self._running if x.decoding] if self._kv is not None else ():
            # the positions its next step writes: a token in flight and K drafts included
            page_pool.room(self, live, live.last_pos + 2 + self.speculate)
        decoding = [x for x in self._running if x.decoding]
        left, chunks = self.token_budget - len(decoding), []
        for live in [x for x in self._running if not x.decoding]:
            rest = len(live.req.prompt_ids) - live.prefilled
            if self._whole:  # H2O: generate's chunks, whatever the budget
                if left <= 0 and left < self.token_budget - len(decoding):
                    break
                n = min(rest, min(max(MIN_CHUNK, pow2(len(live.req.prompt_ids))), MAX_CHUNK))
            elif left < min(rest, MIN_CHUNK):
                break
            else:
                n = min(rest, left)
            chunk = self._chunk(live, n)
            if self._kv is not None and not page_pool.room(self, live, live.prefilled + chunk[1]):
                continue  # it was preempted
            chunks.append(chunk)
            left -= chunk[1]
        for live, n, t, args in chunks:
            fn = self._steps.prefill(t)
            tok, self._cache = fn(self.compiled.weights, self._cache_now(), *args)
            self._prefilled(live, n, tok)
        decoding = [x for x in decoding if x in self._running]  # none preempted
        if self._draft is not None:
            self._draft.sync(self._running)
        if decoding:
            self._decode(decoding)

    def _cache_now(self):
        """The cache, with the block tables as the host has them."""
        if self._kv is not None and self._kv.dirty:
            self._cache = {**self._cache, "table": jnp.asarray(self._kv.table)}
            self._kv.dirty = False
        return self._cache

    def _chunk(self, live: Live, n: int):
        """(live, tokens taken, chunk length, `make_slot_prefill`'s arguments) for the next
        `n` (or fewer) prompt tokens of `live`."""
        n, t, args = chunk_args(live.req.prompt_ids, live.prefilled, n, live.slot,
                                self._chunk_rows, self._rows, self._cache_len)  # fmt: skip
        return live, n, t, (*args, pack_slots([live.req.sampling], self._chunk_rows))

    def _prefilled(self, live: Live, n: int, tok) -> None:
        live.prefilled += n
        self.metrics.add("prefill_chunks", 1)
        self.metrics.add("prompt_tokens", n)
        if live.decoding:
            if self._prefix is not None:
                self._prefix.insert(live.req.prompt_ids, self._cache, live.slot)
            if self._kv is not None:
                self._kv.insert(live.slot, live.req.prompt_ids)
            self._emit(live, int(np.asarray(tok)[0]))

    def _decode(self, decoding: list[Live]) -> None:
        """One decode step for every decoding request, dispatched before the previous
        step's tokens are read (vLLM's asynchronous scheduling): the device runs step n + 1
        on step n's tokens while the host hands those out. A request that stops at step n
        has decoded one token more, which nothing reads. Speculation runs synchronously."""
        if self._spec_ok:  # drafts are drafted from every token, on the host
            self._read_flight()
            decoding = [x for x in decoding if x in self._running]
            k = self.speculate
            if decoding and all(
                max(x.prefilled, x.last_pos) + k < self._cache_len for x in self._running
            ):
                return self._verify(decoding, k)
        flight = self._flight
        behind = set(flight[0]) if flight is not None else set()  # a token in flight
        batch = [x for x in decoding  # a request whose last token is in flight is done
                 if len(x.ids) + (x in behind) < x.req.max_new_tokens]  # fmt: skip
        self._flight = None
        if batch:
            fn = self._steps.decode()[1]
            nxt, self._cache = fn(self.compiled.weights, self._cache_now(),
                                  *self._decode_args(batch, behind, flight))  # fmt: skip
            self._flight = (batch, nxt)
        if flight is not None:  # step n's tokens, read once step n + 1 runs
            self._decoded(*flight)
        if self._draft is not None:  # the draft's cache follows the tokens on the host
            self._read_flight()

    def _read_flight(self) -> None:
        """Hand out the tokens of the decode step in flight, if any."""
        if self._flight is not None:
            flight, self._flight = self._flight, None
            self._decoded(*flight)

    def _decode_args(self, batch: list[Live], behind: set, flight):
        """`make_slot_decode`'s arguments (tokens, pos, live, sampling, steps, prev,
        ahead): a request in `behind` feeds its token in flight, still on the device."""
        b = self._rows
        tokens, pos = np.zeros((b,), np.int32), np.zeros((b,), np.int32)
        live, steps = np.zeros((b,), bool), np.zeros((b,), np.int32)
        ahead = np.zeros((b,), bool)
        for x in self._running:  # a slot mid-prefill feeds its next prompt position
            pos[x.slot] = x.prefilled
        for x in batch:
            n = x in behind
            if not n:
                tokens[x.slot] = x.ids[-1]
            ahead[x.slot] = n
            pos[x.slot] = x.last_pos + n
            live[x.slot] = True
            steps[x.slot] = len(x.ids) + n
        self._ensure_sampling()
        prev = flight[1] if flight is not None else np.zeros((b,), np.int32)
        return tokens, pos, live, self._sampling, steps, prev, ahead

    def _decoded(self, batch: list[Live], nxt) -> None:
        nxt = np.asarray(nxt)
        for x in batch:
            if x in self._running:  # not ended (a stop, cancelled) since the step ran
                self._emit(x, int(nxt[x.slot]))

    def _verify(self, decoding: list[Live], k: int) -> None:
        from pallax.runtime.engine_draft import verify

        verify(self, decoding, k)

    def _ensure_sampling(self) -> None:
        if self._sampling is None:
            params = [None] * self._rows
            for x in self._running:
                params[x.slot] = x.req.sampling
            self._sampling = pack_slots(params, self._rows)

    def _emit(self, live: Live, tok: int) -> None:
        """Hand one generated token to the request; end it on a stop or its length."""
        req, handle = live.req, live.handle
        live.ids.append(tok)
        handle.token_times.append(time.perf_counter())
        self.metrics.add("generated_tokens", 1)
        stopped = tok in req.stop_ids
        if not stopped:
            live.text += live.decoder.push(tok)
        cut = _find_stop(live.text, req.stop, live.emitted)
        if cut is not None:
            self._send(live, cut)
            self._end(live, "done")
            return
        if stopped or len(live.ids) >= req.max_new_tokens:
            live.text += live.decoder.flush()
            cut = _find_stop(live.text, req.stop, live.emitted)
            self._send(live, len(live.text) if cut is None else cut)
            self._end(live, "done")
            return
        self._send(live, len(live.text) - _held_back(live.text, req.stop))

    def _send(self, live: Live, upto: int) -> None:
        if upto > live.emitted:
            live.handle._push(live.text[live.emitted : upto])
            live.emitted = upto

    def _end(self, live: Live, how: str) -> None:
        if live in self._running:
            self._running.remove(live)
            self._free.append(live.slot)
            self._sampling = None
            if self._kv is not None:
                self._kv.release(live.slot)
        if how == "cancelled":
            self.metrics.add("cancelled", 1)
            result = finish(self.compiled.tokenizer, live.req, live.ids)
            result = dataclasses.replace(result, finish_reason="cancelled")
        else:
            self.metrics.add("finished", 1)
            result = finish(self.compiled.tokenizer, live.req, live.ids)
        live.handle._finish(result)

    def _start_cache(self) -> None:
        from pallax.runtime import prefix_cache

        graph = self._steps.decode()[0]
        self._cache = self._steps.alloc()
        # H2O evicts at the end of a call by the attention mass the call's queries gave:
        # its choice depends on where chunks start, so prompts take generate's chunks.
        self._whole = any(name.endswith("h2o.score") for name, _, _ in graph.cache.entries)
        n_pages = self._prefix_tokens // PREFIX_PAGE
        addressed = prefix_cache.addressed(graph)
        self._spec_ok = addressed and self.speculate > 0
        if n_pages and addressed and self._kv is None:  # a paged cache shares its own pages
            self._prefix = prefix_cache.PrefixCache(
                graph.cache, n_pages, PREFIX_PAGE, self._cache_len
            )
