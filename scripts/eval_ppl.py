"""Perplexity of a text under one or more pass pipelines, through the compiled graph.

    python -m pallax.scripts.eval_ppl --model smollm2-135m --passes none bf16 int8
    python -m pallax.scripts.eval_ppl --file my_text.txt --window 1024 --stride 512
    python -m pallax.scripts.eval_ppl --genres --passes none int4 int4-gptq

The text (default: `data/eval_text.txt`, shipped with pallax; several --file, or
--genres for the held-out genres of `data/eval_genres/`, each reported on its own
line) is tokenized with the model's own tokenizer and scored in sliding windows of
--window tokens moved by --stride: each token is counted once, in the first window
where it has at least window - stride tokens of context (the first window counts all
of its tokens).
Every window goes through `CompiledModel.score`, i.e. the compiled graph and its
KV cache in --chunk-size pieces. Prints perplexity, weight bytes and the change
against the first pipeline.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import numpy as np

DATA = pathlib.Path(__file__).resolve().parent.parent / "data"
DEFAULT_TEXT = DATA / "eval_text.txt"
GENRES = DATA / "eval_genres"


def genre_files() -> list[pathlib.Path]:
    """The held-out genres (poetry, legal, medical, ...): text no calibration set sees."""
    return sorted(f for f in GENRES.glob("*.txt") if f.name != "LICENSE.txt")


def window_log_probs(compiled, ids, window: int, stride: int, chunk_size: int) -> np.ndarray:
    """log p of every token after the first, each scored once over sliding windows."""
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} tokens; perplexity needs at least 2")
    out, scored = [], 1  # ids[scored:] still need a log-probability
    begin = 0
    while scored < len(ids):
        end = min(begin + window, len(ids))
        logp = compiled.score(ids[begin:end], chunk_size=chunk_size)  # targets begin+1 .. end-1
        out.append(logp[scored - begin - 1 :])
        scored = end
        begin = min(begin + stride, max(0, len(ids) - window)) if end < len(ids) else end
    return np.concatenate(out)


def perplexity(compiled, text: str, window: int, stride: int, chunk_size: int = 128) -> float:
    ids = compiled.tokenizer.encode(text)
    return math.exp(-float(np.mean(window_log_probs(compiled, ids, window, stride, chunk_size))))


def _check(args, context_length: int) -> None:
    if args.window < 2 or args.window > context_length:
        raise ValueError(f"--window {args.window} must be in [2, {context_length}]")
    if not 1 <= args.stride <= args.window - 1:
        raise ValueError(f"--stride {args.stride} must be in [1, --window - 1 = {args.window - 1}]")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--file", nargs="+", default=[str(DEFAULT_TEXT)],
                        help="text files (UTF-8), each reported on its own")  # fmt: skip
    parser.add_argument("--genres", action="store_true",
                        help="score the held-out genres of data/eval_genres/ (instead of "
                             "--file)")  # fmt: skip
    parser.add_argument(
        "--passes", nargs="+", default=["none"],
        help="pipelines: 'none' or comma-separated pass names, e.g. bf16 int8; a pipeline "
             "starting with 'gguf' runs on the file's own quantization (keep_quantized=True)",
    )  # fmt: skip
    parser.add_argument("--agreement", type=int, default=0, metavar="N",
                        help="also report greedy agreement with the first pipeline: 8 prompts "
                             "cut from the text, N new tokens each")  # fmt: skip
    parser.add_argument("--prompt-len", type=int, default=48, metavar="L",
                        help="tokens per agreement prompt (long ones exercise a compressed "
                             "KV cache)")  # fmt: skip
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=128)
    args = parser.parse_args(argv)
    import pallax

    try:
        files = genre_files() if args.genres else [pathlib.Path(f) for f in args.file]
        stems = [f.stem for f in files]
        names = stems if len(set(stems)) == len(stems) else [str(f) for f in files]
        texts = {k: f.read_text(encoding="utf-8") for k, f in zip(names, files, strict=True)}
        if not texts:
            raise ValueError(f"no *.txt texts in {GENRES}")
        model = pallax.load(args.model)
        _check(args, model.config.context_length)
        pipelines = [[] if p == "none" else [s for s in p.split(",") if s] for p in args.passes]
        kept = None
        compiled = []
        for p in pipelines:  # compiling validates the pass names before any work
            if p[:1] == ["gguf"]:
                kept = kept or pallax.load(args.model, keep_quantized=True)
                compiled.append(pallax.compile(kept, passes=p[1:]))
            else:
                compiled.append(pallax.compile(model, passes=p))
        if args.agreement < 0:
            raise ValueError(f"--agreement {args.agreement} must be >= 0")
        if not 1 <= args.prompt_len <= model.config.context_length - args.agreement:
            raise ValueError(
                f"--prompt-len {args.prompt_len} must be in [1, context length "
                f"{model.config.context_length} - --agreement {args.agreement}]"
            )
    except (OSError, ValueError, TypeError) as e:
        print(f"eval_ppl: error: {e}", file=sys.stderr)
        return 2
    n = sum(len(model.tokenizer.encode(t)) for t in texts.values())
    what = f"{len(texts)} texts, " if len(texts) > 1 else ""
    print(f"{args.model}: {what}{n} tokens, window {args.window}, stride {args.stride}")
    base: dict[str, float] = {}
    ids = model.tokenizer.encode(next(iter(texts.values())))
    prompts = agreement_prompts(ids, length=args.prompt_len) if args.agreement else []
    base_tokens = None
    for name, c in zip(args.passes, compiled, strict=True):
        mb = c.pipeline_graph().weight_bytes() / 1e6
        for genre, text in texts.items():
            ppl = perplexity(c, text, args.window, args.stride, args.chunk_size)
            base.setdefault(genre, ppl)
            label = f"{name:24s} | " + (f"{genre:16s} | " if len(texts) > 1 else "")
            line = (
                f"{label}ppl {ppl:9.4f} | {100 * (ppl / base[genre] - 1):+6.2f}% | "
                f"weights {mb:8.1f} MB"
            )
            if prompts and genre == next(iter(texts)):
                outs = c.generate(prompts, max_new_tokens=args.agreement, ignore_eos=True)
                toks = np.asarray([o.token_ids for o in outs])
                base_tokens = toks if base_tokens is None else base_tokens
                same = toks == base_tokens
                prefix = np.where(same.all(1), same.shape[1], np.argmin(same, axis=1))
                line += (
                    f" | greedy: {int(same.all(1).sum())}/{len(prompts)} identical, "
                    f"{same.mean():.0%} of tokens, mean common prefix {prefix.mean():.1f}"
                )
            print(line, flush=True)
    return 0


def agreement_prompts(ids, n: int = 8, length: int = 48) -> list[list[int]]:
    """n prompts of `length` tokens cut at evenly spaced places from the text."""
    if len(ids) < length:
        return [list(ids)]
    starts = np.linspace(0, len(ids) - length, n).astype(int)
    return [list(ids[s : s + length]) for s in starts]


if __name__ == "__main__":
    sys.exit(main())
