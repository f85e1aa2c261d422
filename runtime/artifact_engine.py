"""The serving engine's steps in an artifact: `pallax serve ARTIFACT` without the model code.

`compiled.export(path, engine={"max_batch": 8, "max_len": 1024})` (keys as `Engine`'s:
max_batch, token_budget, max_len, speculate) adds the engine's slot steps
(`runtime/engine_steps.py`) for that engine's shape to the artifact:

    engine-decode-b{R}-s{S}            one token for each of R slots of S tokens
    engine-prefill-b{P}-t{T}-s{S}-n{R}  a prompt chunk of T tokens for P rows, for every
                                       chunk length the engine can pick (powers of two)
    engine-verify-b{R}-t{K+1}-s{S}      with speculate=K: K drafted tokens checked per slot

and records the shape and the cache layout in the manifest's "engine" entry.
`Engine(pallax.load_artifact(path))` runs on those modules; limits it is given must fit
within the exported ones (a smaller max_batch, max_len or token_budget runs on the same
modules; speculate is the exported K or 0).
"""

from __future__ import annotations

import dataclasses

_KEYS = ("max_batch", "token_budget", "max_len", "speculate")


def plan(compiled, engine):
    """The `EngineShape` an export's `engine=` asks for (None: no engine modules), checked
    before anything is traced."""
    from pallax.runtime.engine_steps import EngineShape

    if engine is None or engine is False:
        return None
    if engine is True:
        engine = {}
    if not isinstance(engine, dict):
        raise ValueError(f"engine={engine!r} must be a dict of {', '.join(_KEYS)} (or True)")
    unknown = sorted(set(engine) - set(_KEYS))
    if unknown:
        raise ValueError(f"engine= has unknown keys {unknown}; allowed: {', '.join(_KEYS)}")
    if compiled.data_parallel > 1 or any(p.name == "shard" for p in compiled.passes):
        raise ValueError(
            "engine= exports an unsharded model's engine steps; this model is sharded "
            "(serve it with pallax.Engine on the compiled model)"
        )
    limits = {"max_batch": 8, "token_budget": 256, "speculate": 0, **engine}
    return EngineShape.plan(**limits, context=compiled.config.context_length,
                            min_batch=compiled.min_batch)  # fmt: skip


def names(shape, chunks) -> list[str]:
    """The engine modules of a shape with these prompt chunk lengths."""
    b, p, s = shape.rows, shape.chunk_rows, shape.cache_len
    out = [f"engine-decode-b{b}-s{s}"]
    out += [f"engine-prefill-b{p}-t{t}-s{s}-n{b}" for t in chunks]
    if shape.speculate:
        out.append(f"engine-verify-b{b}-t{shape.speculate + 1}-s{s}")
    return out


def export(compiled, shape, run, weights, write) -> dict:
    """Export the engine modules with `run` (jax.export), hand each to `write(name,
    module)`; the manifest's "engine" record."""
    import jax
    import jax.numpy as jnp

    from pallax.runtime.artifact_export import _i32, _sds
    from pallax.runtime.engine_steps import pack_slots

    steps = compiled.slot_steps(shape)
    graph, decode = steps.decode()
    b, p = shape.rows, shape.chunk_rows
    cache = jax.eval_shape(steps.alloc)
    flags = lambda n: jax.ShapeDtypeStruct((n,), jnp.bool_)  # noqa: E731
    sampling = lambda n: _sds(pack_slots([None] * n, n))  # noqa: E731
    whole = any(name.endswith("h2o.score") for name, _, _ in graph.cache.entries)
    chunks = shape.chunk_lengths(whole)
    todo = iter(names(shape, chunks))
    mod = run(decode, weights, cache, _i32(b), _i32(b), flags(b), sampling(b), _i32(b), _i32(b),
              flags(b))  # fmt: skip
    write(next(todo), mod)
    for t in chunks:
        mod = run(steps.prefill(t), weights, cache, _i32(p), flags(p), _i32(p, t), _i32(p),
                  _i32(p), sampling(p))  # fmt: skip
        write(next(todo), mod)
    if shape.speculate:
        k = shape.speculate
        mod = run(steps.verify(k + 1), weights, cache, _i32(b, k + 1), _i32(b), sampling(b),
                  _i32(b), _i32(b))  # fmt: skip
        write(next(todo), mod)
    return {
        **dataclasses.asdict(shape),
        "chunks": list(chunks),
        "cache": {
            "entries": [[n, list(d), t] for n, d, t in graph.cache.entries],
            "kind": graph.cache.kind,
        },
    }


def engine_shape(art, **limits):
    """The shape an engine on the artifact `art` runs with: its exported one, with the
    limits given (None: the exported value) no larger."""
    from pallax.runtime.engine_steps import MIN_CHUNK, EngineShape, positive_int

    record = art.manifest.get("engine")
    if not record:
        raise ValueError(
            f"{art._origin} has no engine modules: export it with engine=... "
            "(pallax export --engine) to serve it"
        )
    try:
        fields = {f.name: int(record[f.name]) for f in dataclasses.fields(EngineShape)}
    except (KeyError, TypeError, ValueError) as e:
        raise art._fail(f"its engine record is malformed ({e!r})") from None
    shape = EngineShape(**fields)
    exported = ", ".join(f"{k}={fields[k]}" for k in _KEYS)
    got = {}
    for key, value in limits.items():
        if value is None:
            continue
        got[key] = positive_int(key, value, 0 if key == "speculate" else 1)
        if key == "speculate" and got[key] not in (0, shape.speculate):
            raise ValueError(
                f"speculate={value}: this artifact's engine was exported with speculate="
                f"{shape.speculate} (pass that or 0; {exported})"
            )
        if got[key] > fields[key]:
            raise ValueError(
                f"{key}={value} is more than this artifact's engine was exported for ({exported})"
            )
    shape = dataclasses.replace(shape, **got)
    if shape.token_budget < shape.max_batch + MIN_CHUNK:
        raise ValueError(
            f"token_budget={shape.token_budget} must be at least max_batch + {MIN_CHUNK} = "
            f"{shape.max_batch + MIN_CHUNK}"
        )
    if shape.max_len < 2:
        raise ValueError(f"max_len={shape.max_len} must be an integer >= 2")
    return shape


@dataclasses.dataclass(frozen=True)
class _CacheInfo:
    """What the engine reads from a step's graph: its cache layout and mesh."""

    cache: object  # an ir.graph.CacheLayout
    meta: dict


class ArtifactSlotSteps:
    """`engine_steps.SlotSteps`' interface over an artifact's engine modules."""

    def __init__(self, art, shape):
        from pallax.ir.graph import CacheLayout

        record = art.manifest["engine"]["cache"]
        try:
            entries = tuple((str(n), tuple(d), str(t)) for n, d, t in record["entries"])
            layout = CacheLayout(entries, str(record["kind"]))
        except (KeyError, TypeError, ValueError) as e:
            raise art._fail(f"its engine cache record is malformed ({e!r})") from None
        self.art, self.b, self.p, self.s = art, shape.rows, shape.chunk_rows, shape.cache_len
        self.info = _CacheInfo(layout, {"mesh": art.manifest.get("mesh")})
        for name in names(shape, art.manifest["engine"].get("chunks", ())):
            if f"modules/{name}.jax" not in art.manifest["files"]:
                raise art._fail(f"its engine record names the module {name!r}, which it lacks")

    def decode(self):
        return self.info, self.art._call(f"engine-decode-b{self.b}-s{self.s}", 1)

    def alloc(self):
        return self.art._alloc(f"engine-decode-b{self.b}-s{self.s}", 1)()

    def prefill(self, t: int):
        return self.art._call(f"engine-prefill-b{self.p}-t{t}-s{self.s}-n{self.b}", 1)

    def verify(self, t: int):
        return self.art._call(f"engine-verify-b{self.b}-t{t}-s{self.s}", 1)
