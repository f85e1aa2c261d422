"""A model compiled under a pass pipeline: generate, stream, score, graph.

Graphs are captured per shape bucket (batch, prefill length, cache length) and
the pass pipeline runs on each capture; weight transforms are memoized, so a new
bucket costs a trace and an XLA compile, never a second quantization.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallax import cpu_kernels as _cpu_kernels  # registers the CPU kernel lowerings
from pallax import pallas_kernels as _pallas_kernels  # registers the tpu / cuda lowerings
from pallax.ir.graph import Graph, StepSpec, capture
from pallax.ir.manager import holding, run_passes
from pallax.ir.printer import format_graph
from pallax.ir.qformat import QuantizedWeight
from pallax.model.architectures import module_for
from pallax.passes.quantize_weights import use_packed_weights
from pallax.runtime import generation as gen
from pallax.runtime.generator import Generator, Timings  # noqa: F401 (Timings: public name)
from pallax.runtime.requests import Request

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


class CompiledModel(Generator):
    """Compiled generation for one model and one pass pipeline."""

    def __init__(self, model, passes=()):
        self.model = model
        self.passes = tuple(passes)
        self._graphs: dict = {}
        self._fns: dict = {}
        self._held: dict = {}  # weights the passes made for this model (ir/manager.py)
        self.capture_seconds = 0.0  # tracing + passes; XLA compiles lazily on first call
        # The smallest batch bucket. XLA:CPU drops a batch axis of size 1 and fuses the rest
        # of a step differently: Gemma 3's decode logits move by ~1e-5 between batch 1 and
        # 2 (batches 2, 3 and 8 are bit-equal; SmolLM2's batch 1 is too). 2 runs a lone
        # request beside a padding row, so it gets the bits it would get in any batch, at
        # a fifth of batch-1 decode speed (docs/DESIGN.md, "Batch invariance").
        self.min_batch = 1
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
            # for the shard pass: each weight's logical axes and the attention heads
            "logical_axes": module_for(self.config).logical_axes(self.config),
            "heads": (self.config.n_heads, self.config.n_kv_heads, self.config.head_dim),
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
        with holding(self._held):  # the passes' weight transforms live as long as self
            return run_passes(graph, self.passes)

    def pipeline_graph(self) -> Graph:
        """The graph at a small canonical shape (B=1, prefill 16, cache 256), after passes."""
        if self._display is None:
            s = min(CACHE_ROUND, self.config.context_length)
            b = self.data_parallel
            self._display = self._capture(
                [StepSpec("prefill", b, MIN_PREFILL, s), StepSpec("decode", b, 1, s)]
            )
        return self._display

    def graph(self, step: str = "decode") -> str:
        """The traced graph of `step` ("prefill" or "decode") as text, semantic ops by name."""
        if step not in ("prefill", "decode"):
            raise ValueError(f"step={step!r} must be 'prefill' or 'decode'")
        return format_graph(self.pipeline_graph(), step)

    def memory_report(self, budget_bytes: int | None = None, context: int | None = None,
                      page_size: int | None = None) -> dict:  # fmt: skip
        """Weight bytes, KV bytes per token (all layers, one sequence) and fixed KV bytes
        per sequence (a KIVI residual window, a fixed-size cache), after the passes;
        sharded, also what one device holds (`..._per_device`); the bytes of one page of
        `page_size` tokens of the engine's paged cache (default 16, KIVI's group if
        larger; None for caches that cannot be paged: H2O, sinks, sharded).

        With `budget_bytes` (the device memory for weights + KV cache), also the
        largest batch at `context` tokens (default: the model's context length), the
        largest batch x context (tokens in flight) that fit, and `kv_pages`, the pages
        the budget buys (`Engine(kv_pages=...)`); activations are not counted.
        """
        from pallax.runtime.cost import memory_report

        return memory_report(self, budget_bytes, context, page_size)

    @property
    def abstract(self) -> bool:
        """Whether the weights are abstract (a config alone, or `shard(abstract=True)`):
        compile, graph, memory_report, lower and collectives work; generate does not."""
        from pallax.model.abstract import is_abstract

        return is_abstract(self.model.weights) or any(
            getattr(p, "abstract", False) for p in self.passes if p.name == "shard"
        )

    def _check_runnable(self) -> None:
        if self.abstract:
            raise ValueError(
                f"{self.config.name or self.config.arch} has abstract weights (a config "
                "alone, or shard(abstract=True)): it compiles, reports memory_report() and "
                "lowers (lower(), collectives()), but generate, stream and score need weights"
            )

    def _check_has_values(self, what: str) -> None:
        if self.abstract:
            raise ValueError(f"cannot {what} a model with abstract weights: it has no values")

    def _check_unsharded(self, what: str) -> None:
        """Sharded weights are laid out for one mesh (heads padded or replicated): a
        checkpoint of them is not written yet (an artifact records its mesh)."""
        self._check_has_values(what)
        if any(p.name == "shard" for p in self.passes):
            rest = [p.name for p in self.passes if p.name != "shard"]
            raise ValueError(
                f"cannot {what} a sharded model yet: {what} it without the shard pass "
                f"(passes {rest}) and add shard when compiling what you load"
            )

    def _step_graph(self, step: str, batch: int | None, cache: int | None, tokens=None):
        """(the graph of `step` at a shape bucket, batch, tokens, cache length)."""
        if step not in ("prefill", "decode"):
            raise ValueError(f"step={step!r} must be 'prefill' or 'decode'")
        b = self.data_parallel if batch is None else batch
        s = min(CACHE_ROUND, self.config.context_length) if cache is None else cache
        t = tokens if tokens is not None else 1 if step == "decode" else min(MIN_PREFILL, s)
        for name, value in (("batch", b), ("cache", s), ("tokens", t)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if b % self.data_parallel:
            raise ValueError(f"batch={b} must be a multiple of data={self.data_parallel}")
        ctx = self.config.context_length
        if s > ctx and not self.unbounded_context:
            raise ValueError(f"cache={s} is longer than the context length {ctx}")
        if t > s or (step == "decode" and t != 1):
            raise ValueError(f"tokens={t} must be at most cache={s} (1 for decode)")
        return self._capture([StepSpec(step, b, t, s)]), b, t, s

    def _step(self, step: str, batch: int | None, cache: int | None):
        """(the jitted step, its abstract arguments) at a shape bucket."""
        graph, b, t, s = self._step_graph(step, batch, cache)
        fn = jax.jit(lambda w, cache, *rest: graph.run(step, w, cache, *rest))
        rows = jax.ShapeDtypeStruct((b,), jnp.int32)
        rest = [jax.ShapeDtypeStruct((b, t), jnp.int32), rows]  # tokens, positions
        if step == "prefill":
            rest.append(rows)  # the last prompt token of each row
        data = _input_sharding(graph)
        if data is not None:
            rest = [jax.ShapeDtypeStruct(r.shape, r.dtype, sharding=data) for r in rest]
        return fn, (graph.weights, _allocate(graph, b, s, abstract=True), *rest)

    def lower(self, step: str = "decode", platforms=("tpu",), *, batch=None, cache=None):
        """One `step` ("prefill" or "decode") at batch `batch` (default: the data
        parallelism) and cache length `cache` (default 256) lowered for `platforms`
        ("cpu", "cuda", "tpu"; any, from any machine) with `jax.export`: the
        `jax.export.Exported` (`.mlir_module()` is its StableHLO, Pallas kernels and
        collectives included). Works for abstract weights and meshes."""
        from pallax.runtime.artifact_export import _check_platforms, _exporter

        platforms = _check_platforms(platforms)
        fn, args = self._step(step, batch, cache)
        run, _ = _exporter(list(platforms), portable=False)
        return run(fn, *args)

    def collectives(self, step: str = "decode", platform: str | None = None) -> dict[str, int]:
        """How many of each cross-device collective one `step` ("prefill" or "decode")
        runs: counted in XLA's compiled module on this machine, or with `platform` (and
        always for abstract weights) in the StableHLO lowered for it. 0s unsharded."""
        from pallax.runtime.cost import collectives

        return collectives(self, step, platform)

    def cost(self, step="decode", platform="cpu", *, batch=None, cache=None, tokens=None,
             targets=None):  # fmt: skip
        """Flops and bytes moved per op of one `step` ("prefill" or "decode") at `batch`,
        `cache` length and prefill `tokens` (defaults as `lower`), and its roofline time
        on `targets` (`runtime.cost.TARGETS`; default the platform's: "cpu" this machine
        measured, "cuda" an H100, "tpu" a TPU v5e): a `runtime.cost.CostReport`."""
        from pallax.runtime.cost import step_cost

        return step_cost(self, step, platform, (batch, cache, tokens), targets)

    @property
    def weights(self):
        return self.pipeline_graph().weights

    def save(self, path, *, overwrite: bool = False) -> None:
        """Write the weights after the pass pipeline, config, tokenizer and passes to the
        directory `path`, a pallax checkpoint that `pallax.load(path)` reads back."""
        from pallax.runtime import checkpoint

        self._check_unsharded("save")
        checkpoint.save_checkpoint(self, path, overwrite=overwrite)

    def export(self, path, *, platforms=("cpu",), batch_sizes=(1,), prefill_sizes=(16, 128, 512),
               cache_sizes=None, score_chunk=128, portable=False, overwrite=False,
               xla_cache=True, engine=None):  # fmt: skip
        """Write an ahead-of-time artifact of this model and pipeline to the directory
        `path`: `jax.export` modules of every step for the given shape buckets (cache_sizes
        default: 256, 1024, 4096 and the context length), the weights after the passes
        and the tokenizer. `pallax.load_artifact(path)` runs it without the model code.
        `portable=True` leaves pallax's C++ CPU kernels out of the CPU modules.
        `xla_cache=True` also keeps every module compiled for this machine, which a loader
        on the same platform, versions and CPU uses instead of compiling. `engine`: a dict
        of `pallax.Engine`'s max_batch, token_budget, max_len and speculate (or True for its
        defaults) also exports the engine's steps for that shape, so that
        `pallax.Engine(pallax.load_artifact(path))` serves it."""
        from pallax.runtime.artifact_export import export_artifact

        self._check_has_values("export")

        return export_artifact(
            self, path, platforms=platforms, batch_sizes=batch_sizes,
            prefill_sizes=prefill_sizes, cache_sizes=cache_sizes, score_chunk=score_chunk,
            portable=portable, overwrite=overwrite, xla_cache=xla_cache, engine=engine,
        )  # fmt: skip

    def slot_steps(self, shape, paged=None):
        """The serving engine's steps for an `engine_steps.EngineShape` (over a paged
        cache with `paged=(pages, page_size)`)."""
        from pallax.runtime.engine_steps import SlotSteps

        return SlotSteps(self, shape.rows, shape.chunk_rows, shape.cache_len, paged)

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
            alloc = functools.partial(_allocate, graph, b.batch, b.cache)
            return alloc, gen.make_prefill(graph), gen.make_decode_loop(graph)

        return self._timed(key, build)

    # ----------------------------------------------------------------- buckets
    @property
    def data_parallel(self) -> int:
        """The shard pass's `data` (1 unsharded): batch buckets are multiples of it."""
        return max([getattr(p, "data", 1) for p in self.passes if p.name == "shard"] or [1])

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
        batch = _round_up(_pow2(max(len(reqs), self.min_batch)), self.data_parallel)
        return Buckets(batch=batch, prefill=prefill, chunks=chunks, cache=cache)

    def _score_plan(self, n: int, chunk_size: int) -> tuple[int, int]:
        ctx = self.config.context_length
        if n > ctx and not self.unbounded_context:
            raise ValueError(f"text has {n} tokens; the context length is {ctx}")
        t = min(_pow2(chunk_size), _pow2(n))
        s = max(_round_up(n, CACHE_ROUND), _round_up(n, t))
        if not self.unbounded_context:
            s = min(s, _round_up(ctx, t))
        return t, s

    def _score_fns(self, t: int, s: int):
        rows = self.data_parallel  # one text, repeated on every data shard

        def build():
            graph = self._capture([StepSpec("chunk", rows, t, s)])
            chunk = gen.make_score_chunk(graph)
            if rows > 1:
                inner = chunk

                @functools.partial(jax.jit, donate_argnums=(1,))
                def chunk(weights, cache, tokens, pos, targets):
                    rep = functools.partial(jnp.repeat, repeats=rows, axis=0)
                    return inner(weights, cache, rep(tokens), rep(pos), rep(targets))

            return functools.partial(_allocate, graph, rows, s), chunk

        return self._timed(("score", t, s), build)


def _allocate(graph: Graph, batch: int, seq: int, abstract: bool = False):
    """An empty cache, split over the mesh when the graph is sharded (`abstract`: its
    shapes, dtypes and shardings only)."""
    mesh = graph.meta.get("mesh")
    sharding = None
    if mesh is not None:
        from jax.sharding import NamedSharding

        sharding = NamedSharding(mesh, graph.meta["cache_spec"])
    if abstract:
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                for k, v in graph.cache.shapes(batch, seq).items()}  # fmt: skip
    return graph.cache.allocate(batch, seq, sharding=sharding)


def _input_sharding(graph: Graph):
    """Tokens and positions of a sharded graph: split by batch over "data"."""
    mesh = graph.meta.get("mesh")
    if mesh is None:
        return None
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec("data"))


def _kinds(weights) -> str:
    kinds = sorted({v.describe() for v in weights.values() if isinstance(v, QuantizedWeight)})
    return "; ".join(kinds)


def compile(model, passes=None) -> CompiledModel:  # noqa: A001 - the public API name
    """Compile `model` under `passes` (a list of pass objects or names; [] is valid).

    A model loaded from a pallax checkpoint remembers the passes its weights went through
    (`model.passes`; () for other models): they always run first, so `passes=None` compiles
    it as it was saved and explicit `passes` run after them.

    The default fusion passes (`pallax.passes.DEFAULT_FUSIONS`: "fuse_projections") run
    after the others, before a final shard, unless `passes` names them (they then run
    where named) or leaves them out with a leading minus ("-fuse_projections").
    """
    from pallax.model.loaded import Model
    from pallax.passes import resolve_passes

    if not isinstance(model, Model):
        raise TypeError(f"compile() takes a pallax Model (from pallax.load), got {model!r:.80}")
    from pallax.ir.manager import check_order, initial_facts
    from pallax.passes import with_fusions
    from pallax.passes.evict_kv import check_pipeline
    from pallax.passes.shard import check_pipeline as check_shard

    # Fusion passes a checkpoint recorded run again where compile puts them (after the rest).
    saved = tuple(p for p in model.passes if not getattr(p, "fusion", False))
    pipeline = with_fusions(saved + resolve_passes(passes))
    # Refused before any capture: an order the passes' declared facts rule out, KV passes
    # that cannot compose, a shard before other passes or splitting LLM.int8 outliers.
    packed = any(isinstance(w, QuantizedWeight) for w in model.weights.values())
    check_order(pipeline, initial_facts(packed_weights=packed))
    check_pipeline(pipeline)
    check_shard(pipeline)
    from pallax.ir import lazy

    if lazy.is_lazy(model.weights) and not lazy.places_lazily(pipeline):
        model = dataclasses.replace(model, weights=lazy.materialize(model.weights))
    return CompiledModel(model, pipeline)
