"""The serving engine on an artifact (issue 17 item 8): `compiled.export(path, engine=...)`
adds the engine's slot steps, and `pallax.Engine(pallax.load_artifact(path))` and
`pallax serve DIR` serve it in a process that never imports the model code or the
passes, each request getting the tokens the compiled model's `generate` gives it."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
import urllib.request

import pytest

import pallax

ENGINE = {"max_batch": 2, "max_len": 192, "token_budget": 24, "speculate": 2}
SIZES = dict(cache_sizes=(256,), prefill_sizes=(16,), score_chunk=16)
LONG = (
    "Please copy the following list exactly. Apples, pears, plums, cherries, grapes, figs, "
    "dates, lemons, limes, oranges, melons, peaches, apricots, mangoes, papayas, kiwis. "
    "Then the vegetables: carrots, onions, leeks, beans, peas, potatoes, turnips, radishes, "
    "cabbages, spinach, kale, celery, garlic, squash. Here is the first list again: Apples, "
    "pears, plums,"
)
REQUESTS = [  # (prompt, sampling): the long prompt (98 tokens) comes back for a prefix hit
    (LONG, {}),
    ("The capital of France is", {}),
    ("def fib(n):", {"temperature": 0.8, "seed": 7}),
    (LONG, {}),
]


def run(engine, reqs):
    """Every request but the last at once, then the last; (texts, the engine's stats)."""
    with engine as eng:
        first = [eng.submit(p, max_new_tokens=16, **kw) for p, kw in reqs[:-1]]
        texts = [h.result().text for h in first]
        texts.append(eng.submit(reqs[-1][0], max_new_tokens=16, **reqs[-1][1]).result().text)
        return texts, eng.stats()


# Runs in a fresh process: importing pallax.model or pallax.passes raises.
FRESH = (
    textwrap.dedent(
        """
        import json, sys

        class Forbid:
            def find_spec(self, name, path=None, target=None):
                if name.startswith(("pallax.model", "pallax.passes")):
                    raise ImportError(f"the artifact path imported {name}")

        sys.meta_path.insert(0, Forbid())
        import pallax

        """
    )
    + inspect.getsource(run)
    + textwrap.dedent(
        """
        art = pallax.load_artifact(sys.argv[1])
        texts, stats = run(pallax.Engine(art), json.loads(sys.argv[2]))
        print(json.dumps({"texts": texts, "stats": stats, "hits": art.xla_cache_hits}))
        """
    )
)


@pytest.fixture(scope="module")
def int8(smollm2):
    return pallax.compile(smollm2, ["int8"])


@pytest.fixture(scope="module")
def engine_artifact(int8, tmp_path_factory):
    path = tmp_path_factory.mktemp("art") / "int8-engine"
    int8.export(path, engine=ENGINE, xla_cache=True, **SIZES)
    return path


def _expected(compiled, prompt, n=16, **kw):
    return compiled.generate([prompt], max_new_tokens=n, **kw)[0].text


@pytest.mark.slow
def test_a_fresh_process_serves_an_artifact_as_the_compiled_model_generates(engine_artifact, int8):
    """Three requests at once (greedy, greedy, seeded sampling) with 24 tokens a step, so
    the long prompt arrives in chunks, then the long prompt again: it starts from the
    prefix cache. The texts are the compiled model's engine's (greedy ones `generate`'s:
    a speculating engine samples other tokens than `generate`, from the same
    distribution). Every module is the executable compiled at export."""
    manifest = json.loads((engine_artifact / "manifest.json").read_text())
    assert manifest["engine"]["chunks"] == [1, 2, 4, 8, 16, 32]
    assert manifest["engine"]["rows"] == 2 and manifest["engine"]["cache_len"] == 256
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(engine_artifact), json.dumps(REQUESTS)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    texts, stats = run(pallax.Engine(int8, **ENGINE), REQUESTS)
    assert got["texts"] == texts
    for (prompt, kw), text in zip(REQUESTS, texts, strict=True):
        if not kw:
            assert text == _expected(int8, prompt), prompt
    assert got["stats"] == stats

    assert stats["prefix_hit_tokens"] >= 64, stats
    assert stats["prefill_chunks"] > len(REQUESTS), stats  # chunks of at most 24 tokens
    assert stats["drafted_tokens"] > 0 and stats["accepted_tokens"] > 0, stats
    # speculating, every decode step is a verification
    assert {"engine-prefill-b1-t16-s256-n2", "engine-verify-b2-t3-s256"} <= set(got["hits"]), got


def test_an_artifact_engine_takes_its_exported_limits_or_less(engine_artifact):
    art = pallax.load_artifact(engine_artifact)
    exported = "max_batch=2, token_budget=24, max_len=192, speculate=2"
    for limits, match in [
        (
            {"max_batch": 3},
            f"max_batch=3 is more than this artifact's engine was exported for \\({exported}\\)",
        ),  # fmt: skip
        ({"max_len": 193}, "max_len=193 is more than"),
        ({"token_budget": 64}, "token_budget=64 is more than"),
        ({"speculate": 1}, r"speculate=1: this artifact's engine was exported with speculate=2"),
        ({"token_budget": 10}, r"token_budget=10 must be at least max_batch \+ 16 = 18"),
        ({"max_batch": 0}, "max_batch=0 must be an integer >= 1"),
        ({"kv_pages": 64}, "kv_pages= needs a CompiledModel: an artifact's engine modules"),
    ]:
        with pytest.raises(ValueError, match=match):
            pallax.Engine(art, **limits)
    with pallax.Engine(art, max_batch=1, max_len=64, token_budget=17, speculate=0) as eng:
        assert (eng.max_batch, eng.max_len, eng.token_budget, eng.speculate) == (1, 64, 17, 0)
        with pytest.raises(ValueError, match="exceeds this engine's max_len=64"):
            eng.submit("hello", max_new_tokens=64)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pallax.scripts.cli", *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_cli_refuses_engine_flags_that_do_not_apply(engine_artifact):
    for args, match in [
        (["serve", str(engine_artifact), "--passes", "int8"], "is an artifact, whose passes ran"),
        (["serve", str(engine_artifact), "--max-batch", "4"], "max_batch=4 is more than"),
        (["export", "smollm2-135m", "/tmp/unused", "--max-batch", "2"],
         "--max-batch set the limits of an exported engine: add --engine"),
    ]:  # fmt: skip
        proc = _cli(*args)
        assert proc.returncode != 0 and match in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_serves_an_artifact(engine_artifact, int8):
    from tests.conftest import cli_server, post_json

    with cli_server(engine_artifact, "--max-batch", "1") as url:
        body = {"model": "s", "prompt": LONG, "max_tokens": 8, "temperature": 0}
        out = post_json(url + "/v1/completions", body)
        assert out["choices"][0]["text"] == _expected(int8, LONG, 8)
        metrics = urllib.request.urlopen(url + "/metrics", timeout=60).read().decode()
        assert "pallax_drafted_tokens_total" in metrics, metrics  # speculate=2 by default
