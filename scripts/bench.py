"""Decode speed of pallax against HF transformers (and llama.cpp if installed), same run.

    python -m pallax.scripts.bench --batch 1 8 --prompt-len 128 --new-tokens 128

Every engine gets the same weights file and the same prompts (seeded random token
ids), generates exactly --new-tokens tokens greedily (EOS ignored), and is timed
--repeats times after a warm-up; medians are printed. Decode tokens/s excludes
prefill (timed separately as a 1-token generation); ratios are against
transformers fp32 at the same batch size.
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


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_pallax(model, passes, prompts, new_tokens, repeats):
    import pallax

    compiled = pallax.compile(model, passes=passes)
    t0 = time.perf_counter()
    compiled.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
    compiled.generate(prompts, max_new_tokens=1, ignore_eos=True)
    first = time.perf_counter() - t0
    total = _median_time(
        lambda: compiled.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True), repeats
    )
    prefill = _median_time(
        lambda: compiled.generate(prompts, max_new_tokens=1, ignore_eos=True), repeats
    )
    compile_s = max(0.0, first - total - prefill)
    return total, prefill, compile_s


def bench_hf(path, dtype_name, prompts, new_tokens, repeats):
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
    return _median_time(lambda: gen(new_tokens), repeats), _median_time(lambda: gen(1), repeats)


def bench_llama_cpp(path, prompts, new_tokens, repeats):
    try:
        import llama_cpp
    except ImportError:
        return None
    if len(prompts) != 1:
        return None
    n_ctx = max(1024, len(prompts[0]) + new_tokens + 16)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, verbose=False)

    def gen(n):
        llm.reset()
        out = 0
        for _ in llm.generate(prompts[0], temp=0.0, reset=True):
            out += 1
            if out >= n:
                break

    gen(2)
    return _median_time(lambda: gen(new_tokens), repeats), _median_time(lambda: gen(1), repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=["fp32", "bf16"],
                        help="pallax pass pipelines: fp32 (no passes), comma-separated pass "
                             "names (e.g. int8-outliers, bf16,int4), or gguf (the file's own "
                             "quantization, load(keep_quantized=True))")  # fmt: skip
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = parser.parse_args(argv)

    import pallax
    from pallax.model import sources

    path = sources.resolve(args.model)
    model = pallax.load(path)
    kept = pallax.load(path, keep_quantized=True) if "gguf" in args.configs else None
    pipelines = {c: [] if c in ("fp32", "gguf") else c.split(",") for c in args.configs}
    for c, passes in pipelines.items():  # bad pass names fail here, before any timing
        pallax.compile(kept if c == "gguf" else model, passes=passes)
    n = args.new_tokens
    rows = []
    for b in args.batch:
        prompts = _prompts(b, args.prompt_len, model.config.vocab_size)
        base = None
        if not args.no_hf:
            total, prefill = bench_hf(path, "float32", prompts, n, args.repeats)
            base = b * (n - 1) / (total - prefill)
            rows.append((b, "transformers fp32", base, b * n / total, None))
        for cfg in args.configs:
            m = kept if cfg == "gguf" else model
            total, prefill, comp = bench_pallax(m, pipelines[cfg], prompts, n, args.repeats)
            rows.append((b, f"pallax {cfg}", b * (n - 1) / (total - prefill), b * n / total, comp))
        lc = bench_llama_cpp(path, prompts, n, args.repeats)
        if lc is not None:
            total, prefill = lc
            rows.append((b, "llama.cpp (gguf)", (n - 1) / (total - prefill), n / total, None))
        for row in rows:
            if row[0] == b:
                _print_row(row, base)
        sys.stdout.flush()
    return 0


def _print_row(row, base):
    b, name, decode, e2e, comp = row
    ratio = f"{decode / base:5.2f}x" if base else "   - "
    comp_s = f"{comp:6.1f}s" if comp is not None else "     -"
    print(f"batch {b:2d} | {name:22s} | decode {decode:7.1f} tok/s | end-to-end {e2e:7.1f} tok/s "
          f"| vs transformers {ratio} | compile {comp_s}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
