"""fuse_projections: the graph before and after, outputs bit-equal to the unfused pipeline
in every weight and KV format, its place in a pipeline, leaving it out by name, and what
its fused op lowers to on cpu, tpu and cuda.

A tiny Llama written as GGUF (tests/model/test_synthetic_gguf.py) keeps each compile to a
second or two; its mixed-format variant (q8_0, q4_0, q4_1, q5_0, q5_1 blocks beside float
weights) is the case one kernel call must handle across formats."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import pallax
from pallax.passes import DEFAULT_FUSIONS, fuse_projections
from tests.model.test_synthetic_gguf import KEPT, LAYERS, write_tiny

TEXT = "Hello world, this is a small synthetic model with random weights, fused or not."
PROMPTS = ["Hello world, this", "The capital of France is a city"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_gguf_path):
    return pallax.load(write_tiny(tmp_path_factory.mktemp("fuse") / "t.gguf", smollm2_gguf_path))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, smollm2_gguf_path):
    path = write_tiny(tmp_path_factory.mktemp("fuse") / "mixed.gguf", smollm2_gguf_path, KEPT)
    return pallax.load(path, keep_quantized=True)


def _names(compiled):
    return [p.name for p in compiled.passes]


def test_graph_before_after(tiny):
    before = pallax.compile(tiny, ["-fuse_projections"])
    after = pallax.compile(tiny, [])
    assert _names(before) == [] and _names(after) == ["fuse_projections"]
    b, a = before.graph("decode"), after.graph("decode")
    assert "linears" not in b and f"linear x{7 * LAYERS}" in b.splitlines()[-1]
    summary = a.splitlines()[-1]
    # q/k/v and gate/up fused per layer; each member still counted (and printed) as itself
    assert f"linears x{2 * LAYERS}" in summary and f"linear x{7 * LAYERS}" in summary
    groups = re.findall(r"= linears\[(\d) members\] %\d+ ([^\n]+)", a)
    assert len(groups) == 2 * LAYERS
    for i in range(LAYERS):
        p = f"layers.{i}."
        assert ("3", f"{p}wq {p}wk {p}wv") in groups
        assert ("2", f"{p}w_gate {p}w_up") in groups
    # wo and w_down read activations of their own: they stay single
    assert (
        len(re.findall(r"^  %\S+ = linear %\d+ layers\.\d+\.(wo|w_down)$", a, re.M)) == 2 * LAYERS
    )


def _same(fused, unfused, *, min_tokens=6):
    np.testing.assert_array_equal(
        fused.score(TEXT, chunk_size=8), unfused.score(TEXT, chunk_size=8)
    )
    f = fused.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    u = unfused.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    assert [r.token_ids for r in f] == [r.token_ids for r in u]
    assert all(len(r.token_ids) >= min_tokens for r in f)


# bf16, int8 and int4 alone run inside the pairs below (bf16,int4; int8,sinks; int4,h2o);
# int8kv stands for the compressed caches (KIVI-2 besides took ~10 s: the fusion rewrites
# the projections, whatever the cache holds)
PIPELINES = {
    "fp32": [],
    "int8-outliers": ["int8-outliers"],
    "gptq": ["quantize_weights:4:group_size=64:method=gptq"],
    "bf16,int4": ["bf16", "quantize_weights:4:group_size=64"],
    "int8kv": ["int8kv"],
    "int4,h2o": ["quantize_weights:4:group_size=32", "evict_kv:h2o:budget=32:recent=8"],
    "int8,sinks": ["int8", "evict_kv:sinks:sinks=4:window=28"],
}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_outputs_equal_the_unfused_pipeline(tiny, name):
    passes = PIPELINES[name]
    fused, unfused = (
        pallax.compile(tiny, passes),
        pallax.compile(tiny, [*passes, "-fuse_projections"]),
    )
    assert _names(fused)[-1] == "fuse_projections" and "fuse_projections" not in _names(unfused)
    assert "linears[" in fused.graph("decode") and "linears[" in fused.graph("prefill")
    _same(fused, unfused)


def test_mixed_gguf_blocks_run_in_one_kernel_call(mixed):
    """Layer 0's q / k / v are q8_0, q4_0 and q4_1 blocks (gate / up q5_0, q5_1): one call
    of the multi-weight kernel each; layer 1's q (q4_1) and k (q8_0) share one and its
    float v runs alone. Outputs bit-equal to one call per weight."""
    from pallax import cpu_kernels

    fused, unfused = pallax.compile(mixed, []), pallax.compile(mixed, ["-fuse_projections"])
    _same(fused, unfused)
    text = fused.lower("decode", ("cpu",)).mlir_module()
    alone = unfused.lower("decode", ("cpu",)).mlir_module()

    def calls(module, *targets):
        return sum(len(re.findall(rf"custom_call @{t}\b", module)) for t in targets)

    assert (
        calls(text, cpu_kernels.TARGET_MULTI) == 3 and calls(alone, cpu_kernels.TARGET_MULTI) == 0
    )
    singles = (cpu_kernels.TARGET, cpu_kernels.TARGET_OFFSET)
    # the packed members that moved into the 3 calls: 3 + 2 in layer 0, 2 in layer 1
    assert calls(alone, *singles) - calls(text, *singles) == 3 + 2 + 2


@pytest.mark.parametrize("passes", [[], ["bf16"]])
def test_float_members_run_in_one_kernel_call(tiny, passes):
    """float32 and bfloat16 weights: a decode step's q / k / v and gate / up are one call
    of the float multi-weight kernel each (their outputs are bit-equal to the unfused
    pipeline's: test_outputs_equal_the_unfused_pipeline[fp32, bf16]); prefill keeps XLA's
    GEMM per member."""
    from pallax import cpu_kernels

    fused = pallax.compile(tiny, passes)
    unfused = pallax.compile(tiny, [*passes, "-fuse_projections"])
    single = cpu_kernels.TARGET_BF16 if passes else cpu_kernels.TARGET_F32
    multi = cpu_kernels.TARGET_FLOAT_MULTI

    def calls(compiled, step, target):
        return len(
            re.findall(rf"custom_call @{target}\b", compiled.lower(step, ("cpu",)).mlir_module())
        )

    assert calls(fused, "decode", multi) == 2 * LAYERS and calls(unfused, "decode", multi) == 0
    # 5 of each layer's 7 projections moved into the 2 calls (wo and w_down stay single)
    assert calls(unfused, "decode", single) - calls(fused, "decode", single) == 5 * LAYERS
    assert calls(fused, "prefill", multi) == 0


def test_tpu_and_cuda_lower_each_member_to_its_kernel(mixed):
    fused, unfused = pallax.compile(mixed, []), pallax.compile(mixed, ["-fuse_projections"])
    for platform, kernel in (("tpu", "tpu_custom_call"), ("cuda", "mosaic_gpu")):
        a = fused.lower("decode", (platform,)).mlir_module()
        b = unfused.lower("decode", (platform,)).mlir_module()
        assert a.count(kernel) == b.count(kernel) > 0, platform


def test_runs_last_and_again_after_a_later_rewrite(tiny):
    """Named first, it runs where named; a quantization after it sees the projections one
    by one (the fused op is taken apart for its rules), and compile fuses them again
    after it. Before a final shard by default."""
    c = pallax.compile(tiny, ["fuse_projections", "int8"])
    assert _names(c) == ["fuse_projections", "quantize_weights", "fuse_projections"]
    assert re.search(r"= linears\[3 members\][^\n]*\n\s+%\S+ = qlinear\[bits=8", c.graph("decode"))
    _same(c, pallax.compile(tiny, ["int8", "-fuse_projections"]))
    assert _names(pallax.compile(tiny, ["int8", "fuse_projections"])) == [
        "quantize_weights", "fuse_projections"]  # fmt: skip
    assert _names(pallax.compile(tiny, ["kivi2", "shard:tensor=1:data=1"]))[-2:] == [
        "fuse_projections", "shard"]  # fmt: skip


SHARDED = [
    ["shard:tensor=2:data=2"],
    ["int8", "shard:tensor=4:data=2"],
    ["bf16", "quantize_weights:4:group_size=32", "shard:tensor=2"],
]


@pytest.mark.parametrize("passes", SHARDED)
def test_a_sharded_graph_stays_fused(tiny, passes):
    """Under shard, q / k / v and gate / up (split by their outputs) stay one op inside one
    shard_map, and each shard runs them in one multi-weight kernel call; outputs are
    bit-equal to the sharded unfused pipeline. wo and w_down (split by their inputs, or
    gathered by the exact layout) keep their own rules."""
    from pallax import cpu_kernels

    fused, unfused = (
        pallax.compile(tiny, passes),
        pallax.compile(tiny, [*passes, "-fuse_projections"]),
    )
    assert _names(fused)[-2:] == ["fuse_projections", "shard"]
    _same(fused, unfused)
    text = fused.lower("decode", ("cpu",)).mlir_module()
    multi = (
        cpu_kernels.TARGET_FLOAT_MULTI
        if passes[0].startswith("shard")
        else cpu_kernels.TARGET_MULTI
    )
    assert len(re.findall(rf"custom_call @{multi}\b", text)) == 2 * LAYERS
    assert multi not in unfused.lower("decode", ("cpu",)).mlir_module()


def test_left_out_by_name_and_bad_names_refused(tiny):
    assert DEFAULT_FUSIONS == ("fuse_projections",)
    assert _names(pallax.compile(tiny, [pallax.passes.parse_pass("-fuse_projections")])) == []
    with pytest.raises(ValueError, match=r"'-cast'.*-fuse_projections"):
        pallax.compile(tiny, ["-cast"])
    with pytest.raises(ValueError, match="both named and left out"):
        pallax.compile(tiny, ["fuse_projections", "-fuse_projections"])


def test_pass_alone_on_a_captured_graph(tiny):
    """The pass as a Graph -> Graph function: a second run changes nothing, and quantizing
    the fused graph finds every projection's weight by name."""
    from pallax.passes import quantize_weights
    from pallax.passes.quantize_weights import linear_weight_names

    graph = pallax.compile(tiny, ["-fuse_projections"]).pipeline_graph()
    fused = fuse_projections()(graph)
    again = fuse_projections()(fused)
    for step in graph.steps:
        assert str(again.steps[step].jaxpr) == str(fused.steps[step].jaxpr)
    assert linear_weight_names(fused) == linear_weight_names(graph)
    assert len(linear_weight_names(graph)) == 7 * LAYERS
    q = quantize_weights(8)(fused)
    assert "linears" not in str(q.steps["decode"].jaxpr)  # taken apart; compile fuses again
    assert str(q.steps["decode"].jaxpr).count("qlinear") == 7 * LAYERS


def test_a_checkpoint_does_not_record_it(tiny, tmp_path):
    c = pallax.compile(tiny, ["int8"])
    assert _names(c) == ["quantize_weights", "fuse_projections"]
    c.save(tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "pallax_checkpoint.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == ["quantize_weights"]
    again = pallax.compile(pallax.load(tmp_path / "ckpt"))
    assert _names(again)[-1] == "fuse_projections" and "linears[" in again.graph("decode")
    _same(again, c)
