"""A request's handle in the serving engine: streamed text, the result, cancellation."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import threading
import time

from pallax.runtime.requests import GenerationResult, Request


class EngineClosed(RuntimeError):
    """The engine was closed (or stopped on an error) and takes no more requests."""


class Counters(collections.Counter):
    """The engine's counters: its thread adds, any thread may read a snapshot."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self[key] += n

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self)


class EngineBusy(RuntimeError):
    """The engine's waiting queue is full (`max_waiting`): try again later."""


class RequestHandle:
    """One submitted request. Iterate it (`for piece in handle`, or `async for`) for its
    text as it is generated; `result()` waits for the `GenerationResult`; `cancel()` ends
    it (finish reason "cancelled") and frees its slot. One consumer may iterate it.

    `arrival` and `token_times` (`time.perf_counter()` seconds, one per generated token)
    give time to first token and inter-token latency."""

    def __init__(self, engine, request):
        self._engine = engine
        self.request = request
        self.arrival = time.perf_counter()
        self.token_times: list[float] = []
        self._pieces: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # set by `async for`
        self._apieces: asyncio.Queue | None = None
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self.cancelled = False

    # engine side
    def _deliver(self, item) -> None:
        with self._lock:
            if self._loop is None:
                self._pieces.put(item)
                return
            try:  # to the event loop of the `async for`, without a thread per piece
                self._loop.call_soon_threadsafe(self._apieces.put_nowait, item)
            except RuntimeError:  # that loop is closed: nobody listens any more
                pass

    def _push(self, text: str) -> None:
        self._deliver(("text", text))

    def _finish(self, result: GenerationResult) -> None:
        self._result = result
        self._done.set()
        self._deliver(("end", None))

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()
        self._deliver(("error", error))

    # caller side
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """End the request at the engine's next step (no effect once it is done)."""
        if not self.done:
            self.cancelled = True
            self._engine._wake()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The final result (waits up to `timeout` seconds; TimeoutError past it)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the request did not finish within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"the engine stopped on an error: {self._error!r}") from self._error
        return self._result

    def _next(self, kind_value):
        kind, value = kind_value
        if kind == "error":
            raise RuntimeError(f"the engine stopped on an error: {value!r}") from value
        return kind, value

    def __iter__(self):
        while True:
            kind, value = self._next(self._pieces.get())
            if kind == "end":
                return
            yield value

    async def __aiter__(self):
        with self._lock:
            if self._loop is not None:
                raise RuntimeError("this request is already iterated with async for")
            self._loop, self._apieces = asyncio.get_running_loop(), asyncio.Queue()
            while not self._pieces.empty():
                self._apieces.put_nowait(self._pieces.get_nowait())
        while True:
            kind, value = self._next(await self._apieces.get())
            if kind == "end":
                return
            yield value


@dataclasses.dataclass(eq=False)
class Live:
    """A request inside the engine."""

    req: Request
    handle: RequestHandle
    decoder: object  # a StreamDecoder
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the cache
    ids: list = dataclasses.field(default_factory=list)  # generated tokens
    text: str = ""  # decoded so far (stop tokens not included)
    emitted: int = 0  # characters of `text` handed to the handle
    draft_pos: int = 0  # positions the draft model's cache holds (runtime/engine_draft.py)
    saved: object = None  # a preempted request's pages in host memory (runtime/page_pool.py)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.req.prompt_ids)

    @property
    def last_pos(self) -> int:
        """The position of a decoding request's last token (not in the cache yet)."""
        return len(self.req.prompt_ids) + len(self.ids) - 1

    def known(self) -> int:
        """How many positions of the request the target's cache holds."""
        return self.last_pos if self.decoding else self.prefilled
