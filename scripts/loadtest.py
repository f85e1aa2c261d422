"""Load test of the serving engine against static batching, same model, same run.

    python -m pallax.scripts.loadtest --requests 32 --rate 4 --max-batch 8
    python -m pallax.scripts.loadtest --interference --passes int8

Requests arrive as a bounded Poisson process (--rate per second, --requests in all), with
mixed lengths: prompt and output lengths drawn log-uniformly from --prompt-len and
--new-tokens (seeded random token ids, EOS ignored, so every system does the same work).

- engine: `pallax.Engine(max_batch, token_budget)`, every request submitted at its
  arrival time and streamed; prints throughput (generated tokens / (last finish - first
  arrival)), time to first token and inter-token latency p50 / p99, and requests lost;
- static: the same arrivals served by `compiled.generate` in batches of --max-batch in
  arrival order (a batch starts once its last request has arrived and the previous batch
  is done); prints its throughput and the engine's ratio to it.

Each system runs the whole workload once untimed first (compiles), then timed.

`--interference` instead measures SARATHI's promise: --max-batch - 1 requests decode
--new-tokens' upper bound tokens each; the p99 inter-token latency of their tokens is
measured alone and again with one --long-prompt-token prompt arriving mid-run.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time

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


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def run_engine(engine, reqs):
    """Submit at arrival times; (throughput tok/s, TTFTs, ITLs, lost, generated)."""
    handles = [None] * len(reqs)
    t0 = time.perf_counter()

    def feeder():
        for i, (arrival, prompt, new) in enumerate(reqs):
            delay = t0 + arrival - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
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
    ap.add_argument("--no-static", action="store_true", help="skip the static-batching run")
    ap.add_argument("--interference", action="store_true")
    ap.add_argument("--long-prompt", type=int, default=1000)
    args = ap.parse_args(argv)
    for name in ("prompt_len", "new_tokens"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            ap.error(f"--{name.replace('_', '-')} {lo} {hi}: need 1 <= LO <= HI")
    import pallax

    compiled = pallax.compile(pallax.load(args.model), args.passes)
    vocab = compiled.config.vocab_size
    need = args.prompt_len[1] + args.new_tokens[1]
    if args.interference:
        need = max(need, args.long_prompt + 2)
    max_len = args.max_len or need
    engine = pallax.Engine(compiled, max_batch=args.max_batch, token_budget=args.token_budget,
                           max_len=max_len)  # fmt: skip
    with engine:
        if args.interference:
            interference(engine, args, vocab)
            return 0
        reqs = workload(args.requests, args.rate, args.prompt_len, args.new_tokens, vocab,
                        args.seed)  # fmt: skip
        print(f"{len(reqs)} requests, {args.rate}/s, prompts {args.prompt_len[0]}-"
              f"{args.prompt_len[1]}, outputs {args.new_tokens[0]}-{args.new_tokens[1]} tokens, "
              f"max_batch {args.max_batch}, token_budget {args.token_budget}")  # fmt: skip
        run_engine(engine, reqs)  # warm-up
        tput, ttft, itl, lost, tokens = run_engine(engine, reqs)
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
