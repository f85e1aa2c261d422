"""Load test of the serving engine against static batching, same model, same run.

    python -m pallax.scripts.loadtest --requests 32 --rate 4 --max-batch 8
    python -m pallax.scripts.loadtest --interference --passes int8
    python -m pallax.scripts.loadtest --http --requests 16
    python -m pallax.scripts.loadtest --prefix 1000
    python -m pallax.scripts.loadtest --grounded --speculate 4 --new-tokens 8 96
    python -m pallax.scripts.loadtest --grounded --speculate 4 --draft smollm2-135m \
        --draft-keep-quantized --new-tokens 8 96

Requests arrive as a bounded Poisson process (--rate per second, --requests in all), with
mixed lengths: prompt and output lengths drawn log-uniformly from --prompt-len and
--new-tokens (seeded random token ids, EOS ignored, so every system does the same work).

- engine: `pallax.Engine(max_batch, token_budget)` (`--kv-pages N`: with a paged KV
  cache of N pages, which preempts requests when full), every request submitted at its
  arrival time and streamed; prints throughput (generated tokens / (last finish - first
  arrival)), time to first token and inter-token latency p50 / p99, and requests lost;
- static: the same arrivals served by `compiled.generate` in batches of --max-batch in
  arrival order (a batch starts once its last request has arrived and the previous batch
  is done); prints its throughput and the engine's ratio to it.

Each system runs the whole workload once untimed first (compiles; the engine's warm-up
prompts are other random ids of the same lengths, so the timed prompts are not in its
prefix cache), then timed.

`--http` sends the same workload to the OpenAI-compatible server (`pallax serve`'s app on
127.0.0.1, streamed SSE; an inter-token latency is then the gap between events).
`--prefix N` prints the time to first token of a prompt with a new N-token prefix and of
a second one sharing it (prefix caching). `--grounded --speculate K` prints batch-1
decode tok/s on input-grounded tasks (copy, extract, continue a given text) with K
prompt-lookup drafts per step against none, and whether the tokens are equal; with
`--draft MODEL` (`--draft-passes`, `--draft-keep-quantized`) the drafts come from that
model instead, and open-ended prompts are measured too.

`--interference` instead measures SARATHI's promise: --max-batch - 1 requests decode
--new-tokens' upper bound tokens each; the p99 inter-token latency of their tokens is
measured alone and again with one --long-prompt-token prompt arriving mid-run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import threading
import time
import types

import numpy as np


def workload(n, rate, prompt_len, new_tokens, vocab, seed):
    """[(arrival s, prompt ids, new tokens)]: Poisson arrivals, log-uniform lengths."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=n) if rate > 0 else np.zeros(n)
    arrivals = np.cumsum(gaps) - gaps[0]

    def lengths(lo_hi):
        lo, hi = lo_hi
        return np.exp(rng.uniform(math.log(lo), math.log(hi), size=n)).astype(int)

    plen, new = lengths(prompt_len), lengths(new_tokens)
    return [
        (float(a), rng.integers(100, min(vocab, 30000), size=int(p)).tolist(), int(m))
        for a, p, m in zip(arrivals, plen, new, strict=True)
    ]


def fresh_ids(reqs, vocab, seed):
    """`reqs` with other random prompt ids of the same lengths: a warm-up that compiles
    every chunk size the timed run takes, without leaving its prompts in the engine's
    prefix cache (a timed run of the same ids would skip their prefill)."""
    rng = np.random.default_rng(seed + 1)
    return [(a, rng.integers(100, min(vocab, 30000), size=len(p)).tolist(), m)
            for a, p, m in reqs]  # fmt: skip


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def run_engine(engine, reqs):
    """Submit at arrival times (to an Engine, or a server's URL); (throughput tok/s,
    TTFTs, ITLs, lost, generated). Over HTTP, an ITL is the gap between SSE events."""
    handles = [None] * len(reqs)
    t0 = time.perf_counter()

    def feeder():
        for i, (arrival, prompt, new) in enumerate(reqs):
            delay = t0 + arrival - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if isinstance(engine, str):  # the server's URL
                handles[i] = HttpRequest(engine, prompt, new)
            else:
                handles[i] = engine.submit(prompt, max_new_tokens=new, ignore_eos=True)

    th = threading.Thread(target=feeder)
    th.start()
    th.join()
    lost, ttft, itl, tokens, end = 0, [], [], 0, t0
    for h, (_, _, new) in zip(handles, reqs, strict=True):
        try:
            res = h.result(timeout=3600)
        except Exception:  # noqa: BLE001 - counted, not raised
            lost += 1
            continue
        if res.finish_reason == "cancelled" or len(res.token_ids) != new:
            lost += 1
        tokens += len(res.token_ids)
        ttft.append(h.token_times[0] - h.arrival)
        itl.extend(np.diff(h.token_times).tolist())
        end = max(end, h.token_times[-1])
    return tokens / (end - t0), ttft, itl, lost, tokens


class HttpRequest:
    """One streamed /v1/completions request on its own thread, with a handle's
    `arrival`, `token_times` (one per non-empty event) and `result()`."""

    def __init__(self, url, prompt, new):
        import httpx2 as httpx  # the client the openai package is built on

        self.arrival, self.token_times, self.tokens, self.reason = time.perf_counter(), [], 0, None
        body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip

        def run():
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=3600) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        self.tokens = event["usage"]["completion_tokens"]
                    for c in event["choices"]:
                        if c["text"]:
                            self.token_times.append(time.perf_counter())
                        self.reason = c["finish_reason"] or self.reason

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def result(self, timeout=None):
        self._thread.join(timeout)
        return types.SimpleNamespace(token_ids=[0] * self.tokens, finish_reason=self.reason)


def run_static(compiled, reqs, batch):
    """generate() in arrival-order batches; throughput tok/s."""
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(reqs), batch):
        group = reqs[i : i + batch]
        delay = t0 + group[-1][0] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        outs = compiled.generate([p for _, p, _ in group], max_new_tokens=[m for *_, m in group],
                                 ignore_eos=True)  # fmt: skip
        tokens += sum(len(o.token_ids) for o in outs)
    return tokens / (time.perf_counter() - t0)


def interference(engine, args, vocab):
    """p99 inter-token latency of max_batch - 1 decoding requests, without and with a long
    prompt arriving once they run."""
    rng = np.random.default_rng(args.seed)
    n, new = args.max_batch - 1, args.new_tokens[1]

    def once(long_prompt):
        hs = [engine.submit(rng.integers(100, 30000, 16).tolist(), max_new_tokens=new,
                            ignore_eos=True) for _ in range(n)]  # fmt: skip
        while min(len(h.token_times) for h in hs) < new // 4:
            time.sleep(0.005)
        late = None
        if long_prompt:
            late = engine.submit(rng.integers(100, min(vocab, 30000), args.long_prompt).tolist(),
                                 max_new_tokens=2, ignore_eos=True)  # fmt: skip
        for h in hs:
            h.result(timeout=3600)
        lo, hi = hs[0].token_times[new // 4], float("inf")
        if late is not None:  # the window: until the long prompt's first token
            late.result(timeout=3600)
            hi = late.token_times[0]
        gaps = [b - a for h in hs for a, b in zip(h.token_times, h.token_times[1:], strict=False)
                if a >= lo and b <= hi]  # fmt: skip
        return pct(gaps, 50), pct(gaps, 99)

    once(True)  # warm-up: compiles every chunk size
    alone, mixed = once(False), once(True)
    print(
        f"decode ITL alone:            p50 {alone[0] * 1e3:7.1f} ms  p99 {alone[1] * 1e3:7.1f} ms"
    )
    print(f"with a {args.long_prompt}-token prompt: p50 {mixed[0] * 1e3:7.1f} ms  "
          f"p99 {mixed[1] * 1e3:7.1f} ms  (p99 ratio {mixed[1] / alone[1]:.2f}x)")  # fmt: skip


def prefix_ttft(engine, vocab, length, seed):
    """Time to first token of a prompt with a new `length`-token prefix, then of another
    prompt sharing it (after a warm-up pair with another prefix)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        prefix = rng.integers(100, min(vocab, 30000), length).tolist()
        times = []
        for _ in range(2):
            h = engine.submit(prefix + rng.integers(100, 30000, 24).tolist(), max_new_tokens=2)
            h.result(timeout=3600)
            times.append(h.token_times[0] - h.arrival)
        out = times
    print(f"{length}-token shared prefix: TTFT first {out[0]:.3f} s, second {out[1]:.3f} s "
          f"({out[0] / out[1]:.1f}x sooner); {engine.stats().get('prefix_hit_tokens', 0)} "
          "prompt tokens taken from the prefix cache")  # fmt: skip


GROUNDED = (  # input-grounded tasks: copy, extract, continue a given text
    "Copy this text exactly, word for word:\n\n{t}",
    "Here is a text:\n\n{t}\n\nQuote the sentence of the text that mentions machines.",
    "Continue this text, repeating its first sentence first:\n\n{t}",
)
PASSAGE = (
    "The Industrial Revolution began in Great Britain in the late eighteenth century. It "
    "transformed economies based on agriculture and handicrafts into economies based on "
    "large-scale industry, mechanized manufacturing, and the factory system. New machines, "
    "new power sources, and new ways of organizing work made existing industries more "
    "productive and efficient."
)


OPEN = (  # open-ended tasks, for a draft model
    "Write a short story about a robot who learns to paint.",
    "Explain how vaccines train the immune system.",
)


def speculation(compiled, args, draft=None):
    """Decode tok/s at batch 1 on input-grounded chat prompts (and open-ended ones with a
    draft model), with and without speculation (medians of 3), and whether the tokens
    are equal."""
    tok = compiled.tokenizer
    tasks = [g.format(t=PASSAGE) for g in GROUNDED] + (list(OPEN) if draft else [])
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True)
               for t in tasks]  # fmt: skip
    rates, texts = {}, {}
    for k in (0, args.speculate):
        kw = {"speculate": k, "draft": draft if k else None}
        with pallax_engine(compiled, 1, args, **kw) as eng:
            eng.submit(prompts[0], max_new_tokens=8).result()  # compiles
            for i, p in enumerate(prompts):
                runs = []
                for _ in range(3):
                    h = eng.submit(p, max_new_tokens=args.new_tokens[1])
                    texts[k, i] = h.result(timeout=3600).token_ids
                    runs.append((len(h.token_times) - 1) / (h.token_times[-1] - h.token_times[1]))
                rates[k, i] = float(np.median(runs))
            stats = eng.stats()
    for i in range(len(prompts)):
        same = texts[0, i] == texts[args.speculate, i]
        print(f"task {i}: decode {rates[0, i]:6.1f} -> {rates[args.speculate, i]:6.1f} tok/s "
              f"({rates[args.speculate, i] / rates[0, i]:.2f}x), tokens equal: {same}")  # fmt: skip
    print(f"acceptance {stats['accepted_tokens']} / {stats['drafted_tokens']} drafted tokens")


@contextlib.contextmanager
def _serving(engine, name):
    """The server's app on a free port of 127.0.0.1, in a thread; yields its URL."""
    import socket

    import uvicorn

    from pallax.runtime.server import make_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(engine, name), host="127.0.0.1",
                                           port=port, log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


def pallax_engine(compiled, max_batch, args, **kw):
    import pallax

    return pallax.Engine(compiled, max_batch=max_batch, token_budget=args.token_budget,
                         max_len=args.max_len or 1024, **kw)  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--passes", nargs="*", default=[])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=4.0, help="arrivals per second (0: all at once)")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(16, 512), metavar=("LO", "HI"))
    ap.add_argument("--new-tokens", type=int, nargs=2, default=(8, 256), metavar=("LO", "HI"))
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--token-budget", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-pages", type=int, default=None,
                    help="a paged KV cache of N 16-token pages (default: slot caches)")  # fmt: skip
    ap.add_argument("--no-static", action="store_true", help="skip the static-batching run")
    ap.add_argument("--interference", action="store_true")
    ap.add_argument("--long-prompt", type=int, default=1000)
    ap.add_argument(
        "--prefix",
        type=int,
        default=None,
        metavar="N",
        help="time to first token with and without a cached N-token prefix",
    )
    ap.add_argument(
        "--speculate",
        type=int,
        default=0,
        metavar="K",
        help="prompt-lookup drafts per step (with --grounded: K vs none)",
    )
    ap.add_argument(
        "--grounded",
        action="store_true",
        help="batch-1 decode speed on input-grounded tasks, --speculate K vs none",
    )
    ap.add_argument(
        "--draft",
        default=None,
        metavar="MODEL",
        help="with --speculate: drafts from this model, not prompt lookup",
    )
    ap.add_argument("--draft-passes", nargs="*", default=[])
    ap.add_argument(
        "--draft-keep-quantized",
        action="store_true",
        help="load the draft's GGUF weights as they are (GGUF-native)",
    )
    ap.add_argument(
        "--http", action="store_true", help="send the workload to `pallax serve`'s app on 127.0.0.1"
    )
    args = ap.parse_args(argv)
    for name in ("prompt_len", "new_tokens"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            ap.error(f"--{name.replace('_', '-')} {lo} {hi}: need 1 <= LO <= HI")
    import pallax

    compiled = pallax.compile(pallax.load(args.model), args.passes)
    draft = None
    if args.draft:
        if args.speculate < 1:
            ap.error("--draft needs --speculate K (>= 1)")
        draft = pallax.load(args.draft, keep_quantized=args.draft_keep_quantized)
        draft = pallax.compile(draft, args.draft_passes)
    vocab = compiled.config.vocab_size
    need = args.prompt_len[1] + args.new_tokens[1]
    if args.grounded:
        if args.speculate < 1:
            ap.error("--grounded compares --speculate K (>= 1) against none")
        speculation(compiled, args, draft)
        return 0
    if args.interference or args.prefix:
        need = max(need, (args.prefix or args.long_prompt) + 26)
    max_len = args.max_len or need
    engine = pallax.Engine(compiled, max_batch=args.max_batch, token_budget=args.token_budget,
                           max_len=max_len, speculate=args.speculate, draft=draft,
                           kv_pages=args.kv_pages)  # fmt: skip
    with engine:
        if args.interference:
            interference(engine, args, vocab)
            return 0
        if args.prefix:
            prefix_ttft(engine, vocab, args.prefix, args.seed)
            return 0
        reqs = workload(args.requests, args.rate, args.prompt_len, args.new_tokens, vocab,
                        args.seed)  # fmt: skip
        print(f"{len(reqs)} requests, {args.rate}/s, prompts {args.prompt_len[0]}-"
              f"{args.prompt_len[1]}, outputs {args.new_tokens[0]}-{args.new_tokens[1]} tokens, "
              f"max_batch {args.max_batch}, token_budget {args.token_budget}")  # fmt: skip
        target, server = engine, contextlib.nullcontext()
        if args.http:
            server = _serving(engine, compiled.config.name or args.model)
        with server as url:
            target = url or engine
            run_engine(target, fresh_ids(reqs, vocab, args.seed))  # warm-up
            tput, ttft, itl, lost, tokens = run_engine(target, reqs)
    print(f"engine: {tput:7.1f} tok/s  TTFT p50 {pct(ttft, 50):.2f} s p99 {pct(ttft, 99):.2f} s  "
          f"ITL p50 {pct(itl, 50) * 1e3:.1f} ms p99 {pct(itl, 99) * 1e3:.1f} ms  "
          f"lost {lost}  ({tokens} tokens)")  # fmt: skip
    if not args.no_static:
        run_static(compiled, reqs, args.max_batch)  # warm-up
        static = run_static(compiled, reqs, args.max_batch)
        print(f"static: {static:7.1f} tok/s  (engine / static {tput / static:.2f}x)")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
