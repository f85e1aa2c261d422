"""Decode speed of pallax against HF transformers (and llama.cpp if installed), same run.

    python -m pallax.scripts.bench --batch 1 8 --prompt-len 128 --new-tokens 128
    python -m pallax.scripts.bench --cold-start --configs fp32 int4-gptq gguf
    python -m pallax.scripts.bench --shard tensor=2 --configs fp32 int8
    python -m pallax.scripts.bench --prefill 1024 --configs fp32 bf16 int8 gguf

`--shard` runs every config a second time under the shard pass (in the same rounds) and
prints the collectives of its compiled decode step.

`--prefill N` times the prompt instead: N-token prompts, one generated token; it prints the
time to first token (wall clock: prefill and the first sampled token) and prompt tokens/s
for pallax, transformers (float32 and bfloat16) and llama.cpp, with ratios.

`--cold-start` times a new process to its first token instead: load + compile against an
exported artifact (`pallax.load_artifact`), with and without the XLA executables kept in
it for this machine (`xla_cache`), for each config. `--cold-start --engine` times a new
serving engine (`pallax.Engine`, 8 slots of 1,024 tokens) to its first two tokens (a
prompt chunk and a decode step) instead, from the model and from an artifact exported
with the engine's steps.

Every engine gets the same weights file and the same prompts (seeded random token
ids) and generates exactly --new-tokens tokens greedily (EOS ignored). After a warm-up
of each, the engines are timed in turns, --repeats rounds of one run each, so that
all of them see the same machine (a shared 2-core VM drifts by 20% over minutes).
A round runs each engine's --new-tokens generation. Decode tokens/s is the engine's own
decode timing where it keeps one (pallax: `compiled.last_timings`; llama.cpp: its perf
counters), else batch x (new_tokens - 1) / (the run's time minus a 1-token run's)
(transformers). Medians over rounds are printed with ratios
against transformers fp32 and, at batch 1, llama.cpp.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def _prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(100, min(vocab, 30000), size=length).tolist() for _ in range(batch)]


def pallax_engine(model, passes, prompts, new_tokens, invariant=True):
    """gen(n) for a compiled pipeline, and its compile seconds: the first runs of both
    lengths timed (each may compile its own cache size) minus warm ones. `invariant`
    False traces it batch-variant (the row-count thresholds; read when steps are traced,
    which the first runs do)."""
    import pallax
    from pallax.ir.primitives import base

    compiled = pallax.compile(model, passes=passes)

    def gen(n):
        compiled.generate(prompts, max_new_tokens=n, ignore_eos=True)
        return compiled.last_timings.decode_tokens_per_s  # the decode loop's own time

    def both():
        t0 = time.perf_counter()
        gen(new_tokens)
        gen(1)
        return time.perf_counter() - t0

    saved, base.BATCH_INVARIANT = base.BATCH_INVARIANT, invariant
    try:  # the first runs trace (and lower) every step this engine times
        first = both()
    finally:
        base.BATCH_INVARIANT = saved
    gen.compiled = compiled
    return gen, max(0.0, first - both())


def hf_engine(path, dtype_name, prompts):
    import torch
    import transformers

    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype
    ).eval()
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def gen(n):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)

    gen(2)
    return gen


def llama_cpp_engine(path, prompts, new_tokens):
    """gen(n) through llama-cpp-python with 2 threads (batch 1 only), or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    if len(prompts) != 1:
        return None
    n_ctx = max(1024, len(prompts[0]) + new_tokens + 16)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, verbose=False)

    perf = getattr(llama_cpp, "llama_perf_context", None)

    def gen(n):
        llm.reset()
        if perf is not None:
            llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        out = 0
        for _ in llm.generate(prompts[0], temp=0.0, reset=True):
            out += 1
            if out >= n:
                break
        if perf is None:
            return None
        data = perf(llm._ctx.ctx)  # llama.cpp's own decode timing, as it prints it
        return data.n_eval * 1e3 / data.t_eval_ms if data.t_eval_ms > 0 else None

    gen(2)
    return gen


def prefill_engines(path, model, kept, pipelines, prompts, hf: bool) -> dict:
    """{name: first() -> seconds to the first token} for every engine (each warmed up)."""
    engines = {}

    def timed(fn):
        def first():
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        first()  # warm-up: compiles, allocations
        return first

    if hf:
        for dtype in ("float32", "bfloat16"):
            gen = hf_engine(path, dtype, prompts)
            engines[f"transformers {dtype}"] = timed(lambda gen=gen: gen(1))
    import pallax

    for cfg, passes in pipelines.items():
        compiled = pallax.compile(kept if _kept(cfg) else model, passes=passes)

        def first(compiled=compiled):
            compiled.generate(prompts, max_new_tokens=1, ignore_eos=True)
            return compiled.last_timings.prefill_s  # the prefill chunks and the first token

        first()
        engines[f"pallax {cfg}"] = first
    lc = llama_cpp_engine(path, prompts, 1)
    if lc is not None:
        engines["llama.cpp (gguf)"] = timed(lambda: lc(1))
    return engines


def run_prefill(engines: dict, batch: int, length: int, repeats: int) -> None:
    """Median time to first token of each engine, timed in turns, and prompt tokens/s with
    ratios against transformers float32 and llama.cpp."""
    times = {name: [] for name in engines}
    for _ in range(repeats):
        for name, first in engines.items():
            times[name].append(first())
    rate = {n: batch * length / statistics.median(t) for n, t in times.items()}
    hf, lc = rate.get("transformers float32"), rate.get("llama.cpp (gguf)")
    for name, r in rate.items():
        vs_hf = f" | vs transformers fp32 {r / hf:5.2f}x" if hf else ""
        vs_lc = f" | vs llama.cpp {r / lc:5.2f}x" if lc else ""
        print(f"prefill {length} | batch {batch:2d} | {name:30s} | first token "
              f"{statistics.median(times[name]) * 1e3:8.1f} ms | prompt {r:7.1f} tok/s"
              f"{vs_hf}{vs_lc}")  # fmt: skip
        sys.stdout.flush()


def measure(engines: dict, batch: int, new_tokens: int, repeats: int) -> dict:
    """{name: (median decode tok/s, median end-to-end tok/s)}, the engines timed in turns
    after a warm-up run of both lengths each."""
    for gen in engines.values():
        gen(new_tokens)
        gen(1)
    rates = {name: ([], []) for name in engines}
    for _ in range(repeats):
        for name, gen in engines.items():
            t0 = time.perf_counter()
            decode = gen(new_tokens)
            total = time.perf_counter() - t0
            if decode is None:  # the peers: a 1-token run stands for the prefill
                t0 = time.perf_counter()
                gen(1)
                prefill = time.perf_counter() - t0
                decode = batch * (new_tokens - 1) / max(total - prefill, 1e-9)
            rates[name][0].append(decode)
            rates[name][1].append(batch * new_tokens / total)
    return {n: (statistics.median(d), statistics.median(e)) for n, (d, e) in rates.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="rounds (medians are printed)")
    parser.add_argument("--configs", nargs="+", default=["fp32", "bf16"],
                        help="pallax pass pipelines: fp32 (no passes), comma-separated pass "
                             "names (e.g. int8-outliers, bf16,int4), or gguf (the file's own "
                             "quantization, load(keep_quantized=True)); fp32 or gguf may lead "
                             "a list of passes: gguf,-fuse_projections")  # fmt: skip
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--cold-start", action="store_true",
                        help="time a new process to its first token instead: load + compile "
                             "against load_artifact, for each config")  # fmt: skip
    parser.add_argument("--engine", action="store_true",
                        help="with --cold-start: a serving engine's first tokens")  # fmt: skip
    parser.add_argument("--shard", default="",
                        help="also run each config under the shard pass, e.g. 'tensor=2' or "
                             "'tensor=2,data=2' (on CPU: that many virtual devices), and print "
                             "the collectives of its decode step")  # fmt: skip
    parser.add_argument("--prefill", type=int, default=0, metavar="N",
                        help="time N-token prompts to their first token instead of decode "
                             "(transformers fp32 and bf16, llama.cpp at batch 1)")  # fmt: skip
    parser.add_argument("--batch-variant", action="store_true",
                        help="also run each config batch-variant (kernel and GEMM forms "
                             "chosen by row count, as before): its cost")  # fmt: skip
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error(f"--new-tokens {args.new_tokens}: must be at least 2 (decode is timed)")
    if args.prefill < 0:
        parser.error(f"--prefill {args.prefill}: must be a positive prompt length")
    if args.prompt_len < 1 or args.repeats < 1 or min(args.batch) < 1:
        parser.error(
            f"--prompt-len {args.prompt_len}, --repeats {args.repeats} and --batch "
            f"{args.batch} must be positive"
        )

    from pallax.scripts.cli import _shard

    try:
        sizes = _shard(args.shard)
    except ValueError as e:
        parser.error(str(e))
    if sizes is not None:
        _virtual_devices(sizes.get("tensor", 1) * sizes.get("data", 1))
    import pallax
    from pallax.model import sources

    path = sources.resolve(args.model)
    if args.cold_start:
        if sizes is not None:
            parser.error("--cold-start times one process on one device; drop --shard")
        return cold_start(path, args.configs, args.repeats, args.engine)
    if args.engine:
        parser.error("--engine applies to --cold-start")
    model = pallax.load(path)
    kept = pallax.load(path, keep_quantized=True) if any(map(_kept, args.configs)) else None
    pipelines = {c: _passes(c) for c in args.configs}
    if sizes is not None:
        shard = "shard:" + ":".join(f"{k}={v}" for k, v in sizes.items())
        pipelines.update({f"{c} +{shard}": [*p, shard] for c, p in list(pipelines.items())})
    if args.batch_variant:
        pipelines.update({f"{c} batch-variant": p for c, p in list(pipelines.items())})
    for c, passes in pipelines.items():  # bad pass names fail here, before any timing
        pallax.compile(kept if _kept(c) else model, passes=passes)
    if args.prefill:
        for b in args.batch:
            prompts = _prompts(b, args.prefill, model.config.vocab_size)
            engines = prefill_engines(path, model, kept, pipelines, prompts, not args.no_hf)
            run_prefill(engines, b, args.prefill, args.repeats)
        return 0
    n = args.new_tokens
    from pallax.runtime.cost import measured_cpu

    bandwidth = measured_cpu().bandwidth  # measured in this run, before any timing
    print(f"memory bandwidth (a streaming read through XLA, this run): {bandwidth / 1e9:.1f} GB/s")
    for b in args.batch:
        prompts = _prompts(b, args.prompt_len, model.config.vocab_size)
        engines, compile_s = {}, {}
        if not args.no_hf:
            engines["transformers fp32"] = hf_engine(path, "float32", prompts)
        for cfg in pipelines:
            m = kept if _kept(cfg) else model
            name = f"pallax {cfg}"
            engines[name], compile_s[name] = pallax_engine(
                m, pipelines[cfg], prompts, n, invariant="batch-variant" not in cfg
            )
        lc = llama_cpp_engine(path, prompts, n)
        if lc is not None:
            engines["llama.cpp (gguf)"] = lc
        result = measure(engines, b, n, args.repeats)
        base = result.get("transformers fp32", (None,))[0]
        peer = result.get("llama.cpp (gguf)", (None,))[0]
        for name, (decode, e2e) in result.items():
            moved = None
            if name in compile_s:  # a pallax pipeline: its weights are read once per step
                weights = engines[name].compiled.memory_report()["weight_bytes"]
                moved = (weights * decode / b, bandwidth)
            _print_row(b, name, decode, e2e, compile_s.get(name), base, peer, moved)
        for name, gen in engines.items():
            if "+shard" in name and b == args.batch[0]:
                counts = gen.compiled.collectives("decode")
                print(f"collectives per decode step | {name} | "
                      + ", ".join(f"{k} {v}" for k, v in counts.items()))  # fmt: skip
        sys.stdout.flush()
    return 0


ENGINE = {"max_batch": 8, "max_len": 1024, "token_budget": 256}
COLD = f"""
import sys, time
t0 = time.perf_counter()
import pallax
mode, src, passes = sys.argv[1], sys.argv[2], [p for p in sys.argv[3].split(",") if p]
if mode == "artifact":
    runner = pallax.load_artifact(src)
else:
    runner = pallax.compile(pallax.load(src, keep_quantized=mode == "gguf"), passes=passes)
if sys.argv[4] == "engine":
    with pallax.Engine(runner, **{ENGINE!r}) as engine:
        engine.submit("The capital of France is", max_new_tokens=2).result()
else:
    runner.generate(["The capital of France is"], max_new_tokens=1)
print(time.perf_counter() - t0)
"""


def _kept(cfg: str) -> bool:
    """Whether a configuration runs the GGUF file's own blocks: "gguf", or "gguf,PASSES"."""
    return cfg.split(" ")[0].split(",")[0] == "gguf"


def _passes(cfg: str) -> list[str]:
    """A configuration's passes: "fp32" and "gguf" are the model as loaded (float32, or the
    file's blocks kept), optionally followed by passes: "gguf,-fuse_projections"."""
    names = [p for p in cfg.split(" ")[0].split(",") if p]
    return names[1:] if names and names[0] in ("fp32", "gguf") else names


def cold_start(path, configs, repeats, engine: bool = False) -> int:
    """Seconds from a new process to the first generated token: the compile path (load,
    passes, trace, XLA compile) against an artifact exported from it (load_artifact and
    the modules' XLA compile) and the same artifact with its executables compiled at
    export (`xla_cache`), medians of `repeats` runs each, in turns. `engine`: a serving
    engine's first two tokens instead (`ENGINE`'s shape)."""
    import subprocess
    import tempfile

    import pallax

    def run(*argv) -> float:
        out = subprocess.run([sys.executable, "-c", COLD, *argv, "engine" if engine else ""],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return float(out.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs:
            mode = "gguf" if _kept(cfg) else "compile"
            passes = ",".join(_passes(cfg))
            model = pallax.load(path, keep_quantized=mode == "gguf")
            compiled = pallax.compile(model, passes=_passes(cfg))
            for cached in (False, True):
                compiled.export(f"{tmp}/{cfg}-{cached}", cache_sizes=(256,), prefill_sizes=(16,),
                                xla_cache=cached, engine=ENGINE if engine else None)  # fmt: skip
            times = {"compile path": [], "artifact": [], "artifact+xla": []}
            for _ in range(repeats):
                times["compile path"].append(run(mode, str(path), passes))
                times["artifact"].append(run("artifact", f"{tmp}/{cfg}-False", ""))
                times["artifact+xla"].append(run("artifact", f"{tmp}/{cfg}-True", ""))
            c, a, x = (statistics.median(v) for v in times.values())
            what = "engine cold start" if engine else "cold start"
            print(f"{what} | pallax {cfg:12s} | compile path {c:6.1f}s | artifact {a:6.1f}s "
                  f"({a / c:4.2f}x) | artifact + xla_cache {x:6.1f}s ({x / c:4.2f}x)")  # fmt: skip
            sys.stdout.flush()
    return 0


def _virtual_devices(n: int) -> None:
    """On a CPU-only host, n virtual devices for the shard pass (before jax starts)."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _print_row(b, name, decode, e2e, comp, base, peer, moved=None):
    """One result; `moved`: (weight bytes per second at the decode rate, the measured
    bandwidth), printed as GB/s and the fraction of that bandwidth."""
    vs_hf = f"{decode / base:5.2f}x" if base else "   - "
    vs_lc = f" | vs llama.cpp {decode / peer:5.2f}x" if peer else ""
    comp_s = f"{comp:6.1f}s" if comp is not None else "     -"
    bw = ""
    if moved:
        bw = f" | weights {moved[0] / 1e9:6.1f} GB/s ({moved[0] / moved[1]:4.0%} of bandwidth)"
    print(f"batch {b:2d} | {name:30s} | decode {decode:7.1f} tok/s | end-to-end {e2e:7.1f} tok/s "
          f"| vs transformers {vs_hf}{vs_lc} | compile {comp_s}{bw}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
