"""The model's decode step exports for cpu, cuda and tpu at once, with the kernels inside."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallax import pallas_kernels  # noqa: F401  (registers the tpu / cuda lowerings)
from pallax.ir import primitives as ops
from pallax.ir.graph import CacheLayout
from pallax.model import llama
from pallax.model.configs import ModelConfig
from pallax.model.llama import weight_shapes as expected_llama_shapes
from pallax.passes import StepSpec, capture, cast, run_passes

TINY = ModelConfig(
    arch="llama", vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
    ffn_dim=512, context_length=1024,
)  # fmt: skip


def _tiny_graph(dtype):
    key = jax.random.key(0)
    weights = {}
    for i, (name, shape) in enumerate(sorted(expected_llama_shapes(TINY).items())):
        scale = 1.0 if len(shape) == 1 else 0.05
        weights[name] = scale * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
    layout = CacheLayout.dense(llama.cache_shapes(TINY), jnp.float32)
    fwd = lambda *a: llama.forward(TINY, *a)  # noqa: E731
    specs = [StepSpec("prefill", 2, 16, 256), StepSpec("decode", 2, 1, 256)]
    graph = capture(fwd, weights, layout, specs, {})
    return run_passes(graph, [cast(dtype)]) if dtype != "float32" else graph


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_decode_step_exports_with_kernels(dtype, monkeypatch):
    # The CPU kernels' custom calls have no export guarantee: lower CPU through XLA.
    monkeypatch.setenv("PALLAX_CPU_KERNELS", "0")
    graph = _tiny_graph(dtype)

    def decode(w, c, tokens, pos):
        return graph.run("decode", w, c, tokens, pos)

    args = (graph.weights, graph.cache.allocate(2, 256), jnp.ones((2, 1), jnp.int32),
            jnp.asarray([5, 9], jnp.int32))  # fmt: skip
    exported = export.export(jax.jit(decode), platforms=["cpu", "cuda", "tpu"])(
        *jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    )
    text = exported.mlir_module()
    n = TINY.n_layers
    assert text.count('kernel_name = "rms_norm"') == 2 * n + 1
    assert text.count('kernel_name = "decode_attention"') == n
    assert "rms_norm_mosaic_gpu" in text and "decode_attention_mosaic_gpu" in text
    # The exported module runs on CPU (reference rules) and agrees with the graph.
    got = exported.call(*args)
    want = jax.jit(decode)(*args)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)


def test_prefill_attention_lowers_to_the_flash_kernel(monkeypatch):
    """Prefill (T > 1) over the dense cache is the FlashAttention kernel on tpu and cuda: one
    per layer, no reference attention left; the module's CPU part still runs the graph."""
    monkeypatch.setenv("PALLAX_CPU_KERNELS", "0")
    from pallax.pallas_kernels.flash_attention.gpu import TRITON_CUSTOM_CALL

    graph = _tiny_graph("bfloat16")

    def prefill(w, c, tokens, pos, last):
        return graph.run("prefill", w, c, tokens, pos, last)

    step = graph.steps["prefill"]
    avals = jax.tree.unflatten(step.in_tree, [v.aval for v in step.jaxpr.jaxpr.invars])
    avals = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), avals)
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
    exported = export.export(jax.jit(prefill), platforms=["cpu", "cuda", "tpu"],
                             disabled_checks=checks)(*avals)  # fmt: skip
    text = exported.mlir_module()
    n = TINY.n_layers
    assert text.count('kernel_name = "rms_norm"') == 2 * n + 1
    assert text.count('kernel_name = "flash_attention"') == n  # tpu
    assert text.count('name = "flash_attention"') - n == n  # cuda: Triton's name attribute
    assert 'kernel_name = "decode_attention"' not in text
    args = (graph.weights, graph.cache.allocate(2, 256), jnp.ones((2, 16), jnp.int32),
            jnp.asarray([0, 7], jnp.int32), jnp.asarray([15, 15], jnp.int32))  # fmt: skip
    np.testing.assert_allclose(
        np.asarray(exported.call(*args)[0]),
        np.asarray(jax.jit(prefill)(*args)[0]),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_dense_rule_prefill_matches_reference(platform, monkeypatch):
    """The lowering rule's glue around the flash kernel (cache writes, q's cast to the cache
    dtype, positions), run with the kernel in interpret mode, against the op's reference."""
    import functools

    from pallax.pallas_kernels import flash_attention as fa
    from pallax.pallas_kernels import lowerings

    monkeypatch.setattr(lowerings, "flash_attention",
                        functools.partial(fa.flash_attention, interpret=True))  # fmt: skip
    rng = np.random.default_rng(0)
    b, t, n, kv, s, h = 2, 24, 6, 2, 96, 32
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
               [(b, t, n, h), (b, t, kv, h), (b, t, kv, h)])  # fmt: skip
    caches = [jnp.asarray(rng.standard_normal((b, kv, s, h)), jnp.bfloat16) for _ in range(2)]
    pos = jnp.asarray([0, 50], jnp.int32)
    kw = dict(scale=h**-0.5, sliding_window=20, softcap=25.0)
    got = lowerings._dense_full_rule(q, k, v, *caches, pos, platform=platform, **kw)
    want = ops.dense_attention(q, k, v, *caches, pos, **kw)
    for g, w in zip(got[1:], want[1:], strict=True):  # the caches: the same writes
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    assert got[0].dtype == q.dtype
    # bfloat16 cache: the kernel's dots take q in bfloat16, the reference's in float32.
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, None)])
def test_quantized_decode_step_exports_with_qmatmul(bits, group, monkeypatch):
    """After quantize_weights, every qlinear lowers to the qmatmul kernel on tpu and cuda.

    The CPU part of the export uses the XLA lowering: pallax's CPU FFI kernel is a custom
    call jax.export does not accept by default (PALLAX_CPU_KERNELS=0 is how to export).
    """
    monkeypatch.setenv("PALLAX_CPU_KERNELS", "0")
    from pallax.pallas_kernels.qmatmul.gpu import TRITON_CUSTOM_CALL
    from pallax.passes import quantize_weights

    graph = run_passes(_tiny_graph("bfloat16"), [quantize_weights(bits, group_size=group)])

    def decode(w, c, tokens, pos):
        return graph.run("decode", w, c, tokens, pos)

    args = (graph.weights, graph.cache.allocate(2, 256), jnp.ones((2, 1), jnp.int32),
            jnp.asarray([5, 9], jnp.int32))  # fmt: skip
    avals = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    n_linear = 7 * TINY.n_layers
    tpu = export.export(jax.jit(decode), platforms=["tpu"])(*avals).mlir_module()
    assert tpu.count('kernel_name = "qmatmul"') == n_linear
    # jax does not list Triton's custom call as export-stable; pallax opts in for it.
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
    exported = export.export(jax.jit(decode), platforms=["cpu", "cuda"], disabled_checks=checks)
    cuda = exported(*avals)
    assert cuda.mlir_module().count('name = "qmatmul"') == n_linear
    got = cuda.call(*args)  # the CPU part runs the reference rules
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(jax.jit(decode)(*args)[0]),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("kv_pass", ["kivi:2", "kivi:4", "int8"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_compressed_prefill_rule_matches_reference(kv_pass, platform, monkeypatch):
    """A chunk over a compressed cache on tpu / cuda: the candidates attended by the flash
    kernel (interpret mode), then the reference's write. Two chunks (a 150-token prompt,
    then 40 more at a query offset, rows of different lengths) give the reference's
    output and the very same cache arrays."""
    import functools

    from pallax.pallas_kernels import flash_attention as fa
    from pallax.pallas_kernels import lowerings
    from pallax.passes import compress_kv

    monkeypatch.setattr(lowerings, "flash_attention",
                        functools.partial(fa.flash_attention, interpret=True))  # fmt: skip
    graph = run_passes(_tiny_graph("float32"), [compress_kv(*kv_pass.split(":"))])
    eqn = next(e for e in graph.steps["prefill"].jaxpr.jaxpr.eqns
               if e.primitive.name == "attention")  # fmt: skip
    params = dict(eqn.params)
    cache = graph.cache.allocate(2, 256)
    from pallax.ir import kvcache

    order = [f"layers.0.{n}" for n in kvcache.part_names(params["format"], params["policy"])]
    state = [cache[k] for k in order]
    rng = np.random.default_rng(0)
    b, n, kv, h = 2, TINY.n_heads, TINY.n_kv_heads, TINY.head_dim
    for t, pos, valid in [(150, [0, 0], [150, 97]), (40, [150, 97], [40, 33])]:
        q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in
                   [(b, t, n, h), (b, t, kv, h), (b, t, kv, h)])  # fmt: skip
        args = (q, k, v, jnp.asarray(pos, jnp.int32), jnp.asarray(valid, jnp.int32), *state)
        want = ops.attention_reference(*args, **params)
        got = lowerings._attention_rule(*args, platform=platform, **params)
        for g, w in zip(got[1:], want[1:], strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        real = np.arange(t)[None, :] < np.asarray(valid)[:, None]  # padding rows: unused
        np.testing.assert_allclose(np.asarray(got[0])[real], np.asarray(want[0])[real],
                                   atol=2e-5, rtol=1e-5)  # fmt: skip
        state = list(want[1:])


# Which ops lower to a kernel, per pipeline, step and platform (TINY: 2 layers, 7 linears
# each). The one reference fallback left is prefill attention under H2O and sinks
# (H2O needs each key's exact attention mass; sinks rotate the query per key).
_NORMS, _LINEARS = 2 * TINY.n_layers + 1, 7 * TINY.n_layers
KERNEL_TABLE = {  # pipeline: (prefill kernels, decode kernels), the same on tpu and cuda
    "default": ({"rms_norm": _NORMS, "flash_attention": 2}, {"rms_norm": _NORMS,
                                                              "decode_attention": 2}),
    "int8": ({"rms_norm": _NORMS, "qmatmul": _LINEARS, "flash_attention": 2},
             {"rms_norm": _NORMS, "qmatmul": _LINEARS, "decode_attention": 2}),
    "int4": ({"rms_norm": _NORMS, "qmatmul": _LINEARS, "flash_attention": 2},
             {"rms_norm": _NORMS, "qmatmul": _LINEARS, "decode_attention": 2}),
    "kivi2": ({"rms_norm": _NORMS, "flash_attention": 2},
              {"rms_norm": _NORMS, "kivi_decode_attention": 2}),
    "int8kv": ({"rms_norm": _NORMS, "flash_attention": 2},
               {"rms_norm": _NORMS, "h2o_decode_attention": 2}),
    "h2o": ({"rms_norm": _NORMS}, {"rms_norm": _NORMS, "h2o_decode_attention": 2}),
}  # fmt: skip
# Fused projections (fuse_projections, on by default in pallax.compile) lower each member
# to the kernel it lowers to alone.
KERNEL_TABLE |= {f"{p}+fuse": KERNEL_TABLE[p] for p in ("default", "int8", "int4")}
_KERNELS = ("rms_norm", "qmatmul", "flash_attention", "decode_attention",
            "kivi_decode_attention", "h2o_decode_attention")  # fmt: skip


def _kernel_counts(text: str, platform: str) -> dict:
    import re

    counts = {}
    for name in _KERNELS:
        if platform == "tpu":
            c = text.count(f'kernel_name = "{name}"')
        else:  # Triton's name attribute, or Mosaic GPU's symbol
            c = len(re.findall(rf'(?<!kernel_)name = "{name}"', text))
            c += len(re.findall(rf"\b\d*{name}_mosaic_gpu\b", text))
        if c:
            counts[name] = c
    return counts


@pytest.mark.parametrize("pipeline", list(KERNEL_TABLE))
def test_kernel_table(pipeline, monkeypatch):
    monkeypatch.setenv("PALLAX_CPU_KERNELS", "0")
    from pallax.pallas_kernels.flash_attention.gpu import TRITON_CUSTOM_CALL
    from pallax.passes import compress_kv, evict_kv, fuse_projections, quantize_weights

    passes = {"default": [], "int8": [quantize_weights(8)],
              "int4": [quantize_weights(4, group_size=32)], "kivi2": [compress_kv("kivi", 2)],
              "int8kv": [compress_kv("int8")],
              "h2o": [evict_kv("h2o", budget=64, recent=16)]}  # fmt: skip
    fused = pipeline.endswith("+fuse")
    passes = passes[pipeline.removesuffix("+fuse")] + ([fuse_projections()] if fused else [])
    graph = run_passes(_tiny_graph("bfloat16"), passes)
    assert fused == ("linears" in str(graph.steps["decode"].jaxpr))
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
    for step, want in zip(("prefill", "decode"), KERNEL_TABLE[pipeline], strict=True):
        spec = graph.steps[step]
        avals = jax.tree.unflatten(spec.in_tree, [v.aval for v in spec.jaxpr.jaxpr.invars])
        avals = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), avals)
        fn = jax.jit(lambda *a, step=step: graph.run(step, *a))
        for platform in ("tpu", "cuda"):
            text = export.export(fn, platforms=[platform], disabled_checks=checks)(
                *avals).mlir_module()  # fmt: skip
            assert _kernel_counts(text, platform) == want, (pipeline, step, platform)
