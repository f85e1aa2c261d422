"""Two processes on loopback (4 virtual CPU devices each, gloo collectives) run the
same sharded `generate` and get the same text as one process unsharded."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("multiprocess_runs.py")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n: int, model: str, meshes: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen([sys.executable, str(SCRIPT), address, str(n), str(i), model, meshes],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(n)
    ]  # fmt: skip
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=900)
            assert p.returncode == 0, err[-3000:]
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            assert lines, (out[-2000:], err[-2000:])
            results.append(json.loads(lines[-1]))
    finally:
        for p in procs:
            p.kill()
    return results


def test_two_processes_give_one_process_text():
    meshes = ("4x2", "8x1")  # data split across the processes; tensor across them
    results = _launch(2, "smollm2-135m", ",".join(meshes))
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        assert (r["devices"], r["local_devices"]) == (8, 4)
        for mesh in meshes:
            assert r[mesh]["texts"] == r["reference"], mesh
            assert r[mesh]["stream"] == r["reference"][0], mesh
            assert r[mesh]["max_dlogprob"] < 1e-4, (mesh, r[mesh]["max_dlogprob"])
    same = [{k: v for k, v in r.items() if k != "process"} for r in results]
    assert same[0] == same[1]


def test_cli_two_processes_print_the_same_text():
    """`pallax generate --shard tensor=4,data=2 --coordinator ...` in two processes."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    address = f"127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "pallax.scripts.cli", "generate", "The capital of France is",
           "--max-new-tokens", "6", "--shard", "tensor=4,data=2", "--coordinator", address,
           "--num-processes", "2", "--local-devices", "4", "--process-id"]  # fmt: skip
    procs = [subprocess.Popen([*cmd, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(2)]  # fmt: skip
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    texts = [[ln for ln in out.splitlines() if ln.startswith("The capital")] for out, _ in outs]
    assert texts[0] == texts[1] == [texts[0][0]] and texts[0][0].startswith(
        "The capital of France is Paris"
    ), outs
