"""The `pallax` command: generate, export, run, inspect.

    pallax generate "The capital of France is" --max-new-tokens 32 --passes bf16
    pallax export smollm2-135m smollm2-int8 --passes int8 --platforms cpu,cuda,tpu
    pallax run smollm2-int8 "The capital of France is"
    pallax inspect --step decode --passes cast:bfloat16

Bad input prints one line naming the problem (no traceback) and exits 2. Ctrl-C (or
SIGTERM) at any moment prints `pallax: interrupted` and exits 130 (143).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading

from pallax.model.sources import SourceError
from pallax.scripts import cli_serve


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from pallax.model.configs import DEFAULT_MODEL

    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="model name or path to a .gguf file (%(default)s)"
    )
    p.add_argument(
        "--passes",
        default="",
        help="comma-separated passes, e.g. 'cast:bfloat16' or 'bf16' (default: none). The "
        "default fusions run after them; '--passes=-fuse_projections' leaves one out",
    )


def _add_sampling_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pallax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a continuation of a prompt")
    g.add_argument("prompt", help="the prompt text")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument(
        "--shard",
        default="",
        help="tensor and data parallelism over the devices of every process, e.g. "
        "'tensor=4,data=2' (',exact=false': Megatron's all-reduce for packed o / down)",
    )
    m = g.add_argument_group("multi-process (every process runs the same command)")
    m.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address; all processes pass the same one")  # fmt: skip
    m.add_argument("--num-processes", type=int, default=None, metavar="N")
    m.add_argument("--process-id", type=int, default=None, metavar="I", help="in [0, N)")
    m.add_argument("--local-devices", type=int, default=None, metavar="K",
                   help="CPU devices in this process (default: jax's, one)")  # fmt: skip

    e = sub.add_parser("export", help="write an ahead-of-time artifact of a compiled model")
    e.add_argument("model", help="model name or path (as --model of generate)")
    e.add_argument("dir", help="the artifact directory to write")
    e.add_argument(
        "--passes",
        default="",
        help="comma-separated passes (default: none; "
        "fusions run after them unless named with '-': --passes=int8,-fuse_projections)",
    )
    e.add_argument("--platforms", default="cpu", help="comma-separated: cpu, cuda, tpu")
    e.add_argument("--batch-sizes", default="1", help="comma-separated batch buckets")
    e.add_argument(
        "--cache-sizes",
        default=None,
        help="comma-separated cache lengths (default: 256,1024,4096,context)",
    )
    e.add_argument("--prefill-sizes", default="16,128,512", help="prompt chunk lengths")
    e.add_argument("--portable", action="store_true", help="CPU modules without C++ kernels")
    e.add_argument("--overwrite", action="store_true", help="replace an existing artifact")
    e.add_argument(
        "--no-xla-cache",
        action="store_true",
        help="do not keep the modules compiled for this machine (smaller, slower to start)",
    )
    eng = e.add_argument_group("serving engine (pallax serve DIR)")
    eng.add_argument("--engine", action="store_true",
                     help="also export the serving engine's steps for these limits")  # fmt: skip
    cli_serve.add_engine_args(eng)

    r = sub.add_parser("run", help="stream a continuation from an exported artifact")
    r.add_argument("dir", help="the artifact directory")
    r.add_argument("prompt", help="the prompt text")
    _add_sampling_args(r)

    pl = sub.add_parser("plan", help="memory per device and collectives of a model on a mesh, "
                        "from its config alone (a GGUF's header, a config.json)")  # fmt: skip
    pl.add_argument("model", help="a name (e.g. llama-3-70b), an HF config.json or any model path")
    pl.add_argument("--passes", default="", help="comma-separated passes (e.g. int8,kivi2)")
    pl.add_argument("--shard", default="", help="the mesh, e.g. 'tensor=8' (no devices needed)")
    pl.add_argument("--budget-gib", type=float, default=None,
                    help="one device's memory for weights + KV: the largest batch")  # fmt: skip
    pl.add_argument(
        "--context", type=int, default=None, help="tokens per sequence for --budget-gib"
    )
    pl.add_argument("--lower", default="",
                    help="also lower the decode step for these platforms (cpu,cuda,tpu) and "
                         "print its collectives")  # fmt: skip
    pl.add_argument("--cost", default="",
                    help="print the decode step's flops, bytes and roofline time per op on "
                         "these targets (cpu,h100,tpu-v5e), at --batch and --context")  # fmt: skip
    pl.add_argument("--batch", type=int, default=None, help="the batch for --cost")

    cli_serve.add_parser(sub)

    i = sub.add_parser("inspect", help="print the graph before and after each pass")
    _add_model_args(i)
    i.add_argument("--step", default="decode", choices=("prefill", "decode"))
    return parser


def _passes(spec: str):
    from pallax.passes import resolve_passes

    names = [s.strip() for s in spec.split(",") if s.strip()]
    return resolve_passes(names)


def _check_sampling(args) -> None:
    from pallax.runtime.sampling import SamplingParams
    from pallax.text.tokenizer import check_text

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)
    if args.prompt == "":
        raise ValueError("prompt is empty; give at least one character")
    check_text(args.prompt, "the prompt")  # invalid UTF-8 arrives as lone surrogates


def _stream_to_stdout(runner, args) -> None:
    """Stream `runner`'s continuation of the prompt (a compiled model or an artifact)."""
    prompt = args.prompt
    if args.chat:
        prompt = runner.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    stream = runner.stream(
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    if not args.chat:
        sys.stdout.write(args.prompt)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _shard(spec: str) -> dict | None:
    """'tensor=4,data=2' -> the shard pass's sizes (None for ''), checked before any
    device is touched (a multi-process run joins first, then builds its mesh)."""
    if not spec.strip():
        return None
    sizes = {}
    for part in spec.split(","):
        key, eq, value = part.strip().partition("=")
        if key == "exact" and value.strip().lower() in ("true", "false"):
            sizes[key] = value.strip().lower() == "true"
            continue
        if key not in ("tensor", "data") or not eq or not value.strip().isdigit():
            raise ValueError(
                f"--shard={spec!r}: expected 'tensor=T,data=D' with positive integers "
                "(and optionally exact=true|false)"
            )
        sizes[key] = int(value)
        if sizes[key] < 1:
            raise ValueError(f"--shard={spec!r}: {key}={value} must be a positive integer")
    return sizes


def _distributed(args) -> None:
    """Join a multi-process run when --coordinator is given (all three flags or none)."""
    flags = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}  # fmt: skip
    given = [k for k, v in flags.items() if v is not None]
    if not given:
        if args.local_devices is not None:
            raise ValueError("--local-devices applies to a multi-process run (--coordinator)")
        return
    if len(given) != len(flags):
        missing = sorted(set(flags) - set(given))
        raise ValueError(f"{', '.join(given)} needs {', '.join(missing)} as well")
    from pallax import sharding
    from pallax.sharding.distributed import check_args

    check_args(args.coordinator, args.num_processes, args.process_id, args.local_devices)
    # gloo's C++ side prints its connection log to file descriptor 1: keep stdout for the
    # generated text and send descriptor 1 to stderr.
    sys.stdout.flush()
    text_out = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = open(text_out, "w", encoding="utf-8", closefd=True)  # noqa: SIM115
    try:
        sharding.initialize(args.coordinator, args.num_processes, args.process_id,
                            local_cpu_devices=args.local_devices)  # fmt: skip
    except RuntimeError as e:  # jax.distributed: coordinator unreachable, timed out, ...
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(
            f"--coordinator {args.coordinator}: joining the run failed: {first}"
        ) from None


def _generate(args) -> None:
    import pallax

    _check_sampling(args)
    sizes = _shard(args.shard)
    _distributed(args)  # joined before any pass is built: a shard pass lists the devices
    passes = _passes(args.passes)
    if sizes is not None:
        from pallax.passes import shard

        passes = (*passes, shard(**sizes))
    # Sharded: weights are read from the file (GGUF, safetensors or pallax checkpoint)
    # where they are placed, each process reading only its devices' slices.
    model = pallax.load(args.model, lazy=sizes is not None)
    _stream_to_stdout(pallax.compile(model, passes=list(passes)), args)


def _run(args) -> None:
    import pallax

    _check_sampling(args)
    _stream_to_stdout(pallax.load_artifact(args.dir), args)


def _int_list(flag: str, text: str | None):
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}={text!r} must be comma-separated integers") from None


def _export(args) -> None:
    import pallax

    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    sizes = dict(
        batch_sizes=_int_list("--batch-sizes", args.batch_sizes),
        prefill_sizes=_int_list("--prefill-sizes", args.prefill_sizes),
        cache_sizes=_int_list("--cache-sizes", args.cache_sizes),
    )
    passes = _passes(args.passes)
    limits = {k: v for k, v in cli_serve.engine_limits(args).items() if v is not None}
    if limits and not args.engine:
        flags = ", ".join("--" + k.replace("_", "-") for k in limits)
        raise ValueError(f"{flags} set the limits of an exported engine: add --engine")
    engine = limits if args.engine else None
    compiled = pallax.compile(pallax.load(args.model), passes=list(passes))
    path = compiled.export(args.dir, platforms=platforms, portable=args.portable,
                           overwrite=args.overwrite, xla_cache=not args.no_xla_cache,
                           engine=engine, **sizes)  # fmt: skip
    print(f"pallax: wrote {path}")


def _plan(args) -> None:
    import pallax
    from pallax.passes import shard

    passes = list(_passes(args.passes))
    sizes = _shard(args.shard)
    if sizes is not None:
        passes.append(shard(**sizes, abstract=True))
    lower = [p.strip() for p in args.lower.split(",") if p.strip()]
    bad = [p for p in lower if p not in ("cpu", "cuda", "tpu")]
    if bad:
        raise ValueError(f"--lower={args.lower!r}: platforms are cpu, cuda, tpu")
    budget = None
    if args.budget_gib is not None:
        if not (math.isfinite(args.budget_gib) and args.budget_gib > 0):
            raise ValueError(f"--budget-gib={args.budget_gib} must be positive")
        budget = int(args.budget_gib * 2**30)
    targets = [t.strip() for t in args.cost.split(",") if t.strip()]
    from pallax.runtime.cost import TARGETS

    if any(t not in TARGETS for t in targets):
        raise ValueError(f"--cost={args.cost!r}: unknown cost target; known: {list(TARGETS)}")
    if args.context is not None and budget is None and not targets:
        raise ValueError("--context needs --budget-gib or --cost")
    compiled = pallax.compile(pallax.load(args.model, abstract=True), passes=passes)
    context = args.context if budget is not None else None  # --context alone: for --cost
    report = compiled.memory_report(budget_bytes=budget, context=context)
    for key, value in report.items():
        print(f"{key:40s} {value}")
    for platform in lower:
        counts = compiled.collectives("decode", platform=platform)
        print(f"{'decode collectives on ' + platform:40s} "
              + ", ".join(f"{k} {v}" for k, v in counts.items() if v))  # fmt: skip
    if targets:
        print(compiled.cost("decode", batch=args.batch, cache=args.context, targets=targets))


def _inspect(args) -> None:
    import pallax
    from pallax.ir.graph import StepSpec, capture
    from pallax.ir.manager import printing_dump, run_passes
    from pallax.passes import with_fusions

    passes = with_fusions(_passes(args.passes))  # the pipeline compile would run
    model = pallax.load(args.model)
    s = min(256, model.config.context_length)
    specs = [StepSpec("prefill", 1, 16, s), StepSpec("decode", 1, 1, s)]
    graph = capture(model.forward, model.weights, model.cache_layout(), specs, {})
    run_passes(graph, passes, dump=printing_dump(args.step))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        {
            "generate": _generate,
            "run": _run,
            "export": _export,
            "inspect": _inspect,
            "plan": _plan,
            "serve": cli_serve.serve,
        }[args.command](args)
    except (ValueError, OSError, TypeError, SourceError) as e:  # OSError: FileNotFoundError, ...
        print(f"pallax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop(signum) -> None:
    os.write(2, b"\npallax: interrupted\n")
    os._exit(128 + signum)


def _exit_on_signals() -> None:
    """End the process at once on SIGINT / SIGTERM, at any moment.

    Raising KeyboardInterrupt is not safe here: while XLA compiles or runs, the main thread
    is inside C++ (the exception waits until it returns, or is swallowed by jax's gc
    callback), and unwinding into interpreter teardown while XLA's threads run segfaults.
    The command holds no state worth unwinding (saves are atomic on their own), so a
    thread waits for the signals, blocked in every other thread (threads started later
    inherit the mask), prints one line and leaves with `_exit`."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    for s in _STOP_SIGNALS:  # for a signal that reaches a thread started before the mask
        signal.signal(s, lambda signum, frame: _stop(signum))

    def wait() -> None:
        _stop(signal.sigwait(_STOP_SIGNALS))

    threading.Thread(target=wait, name="pallax-signals", daemon=True).start()


def run() -> None:
    """The `pallax` program: `main` with clean exits on interrupts."""
    _exit_on_signals()
    sys.exit(main())


if __name__ == "__main__":
    run()
