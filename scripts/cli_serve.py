"""`pallax serve`: its arguments, the engine limits it shares with `pallax export --engine`,
and the command."""

from __future__ import annotations

import pathlib
import sys


def add_parser(sub) -> None:
    """The `serve` subcommand's arguments."""
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    s.add_argument("model", help="model name or path (as --model of generate), or an artifact "
                   "directory exported with --engine")  # fmt: skip
    s.add_argument(
        "--passes",
        default="",
        help="comma-separated passes (default: none; "
        "fusions run after them unless named with '-': --passes=int8,-fuse_projections)",
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    add_engine_args(s)
    s.add_argument("--max-waiting", type=int, default=64,
                   help="requests waiting for a slot before 429 (%(default)s)")  # fmt: skip
    s.add_argument("--served-name", default=None, help="the model id clients use")
    s.add_argument("--kv-pages", type=int, default=None, metavar="N",
                   help="a paged KV cache of N pages shared by all requests (preempts when "
                   "full); memory_report says how many a budget buys")  # fmt: skip
    s.add_argument("--page-size", type=int, default=None, metavar="P",
                   help="tokens per page with --kv-pages (16)")  # fmt: skip
    s.add_argument("--draft", default=None, metavar="MODEL",
                   help="a draft model with the same tokenizer (needs --speculate)")  # fmt: skip
    s.add_argument("--draft-passes", default="", help="the draft's passes (as --passes)")
    s.add_argument("--draft-keep-quantized", action="store_true",
                   help="run the draft GGUF's quantized tensors as they are")  # fmt: skip


def add_engine_args(group) -> None:
    """An engine's limits (`pallax.Engine`'s; an artifact's own where not given)."""
    group.add_argument("--max-batch", type=int, default=None, help="request slots (8)")
    group.add_argument("--token-budget", type=int, default=None, help="tokens per step (256)")
    group.add_argument("--max-len", type=int, default=None,
                       help="prompt + output tokens per slot (1024 or the context)")  # fmt: skip
    group.add_argument("--speculate", type=int, default=None, metavar="K",
                       help="drafted tokens verified per step (prompt lookup; serve: or "
                       "--draft)")  # fmt: skip


def engine_limits(args) -> dict:
    return {"max_batch": args.max_batch, "token_budget": args.token_budget,
            "max_len": args.max_len, "speculate": args.speculate}  # fmt: skip


def serve(args) -> None:
    import importlib.util

    import pallax
    from pallax.runtime.server import serve as run_server
    from pallax.scripts.cli import _passes

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"serve needs {' and '.join(missing)}: pip install 'pallax[serve]'")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port {args.port} must be in [0, 65536)")
    if args.draft is None and (args.draft_passes or args.draft_keep_quantized):
        raise ValueError("--draft-passes and --draft-keep-quantized apply to a --draft model")
    if args.draft is not None and (args.speculate or 0) < 1:
        raise ValueError(f"--draft {args.draft} needs --speculate K (K >= 1 drafted tokens)")
    from pallax.runtime.artifact import MANIFEST

    if (pathlib.Path(args.model) / MANIFEST).is_file():  # an artifact: compiled at export
        if args.passes:
            raise ValueError(
                f"--passes {args.passes}: {args.model} is an artifact, whose passes ran when "
                "it was exported"
            )
        compiled = pallax.load_artifact(args.model)
    else:
        compiled = pallax.compile(pallax.load(args.model), passes=list(_passes(args.passes)))
    draft = None
    if args.draft is not None:
        model = pallax.load(args.draft, keep_quantized=args.draft_keep_quantized)
        draft = pallax.compile(model, passes=list(_passes(args.draft_passes)))
    paged = {"kv_pages": args.kv_pages, "page_size": args.page_size}
    engine = pallax.Engine(compiled, **engine_limits(args), max_waiting=args.max_waiting,
                           draft=draft, **paged)  # fmt: skip
    name = args.served_name or compiled.config.name or args.model
    print(f"pallax: serving {name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    with engine:
        run_server(engine, name, host=args.host, port=args.port)
