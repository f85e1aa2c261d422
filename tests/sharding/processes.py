"""Starting the processes of a multi-process run in tests: a free loopback port, and N
commands started together with their output in files."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess

# The processes compile XLA's LLVM backend at -O0: the tests check what sharding does
# (partitioning, collectives, placement: XLA's HLO passes, which run in full), and both
# sides of every comparison run in processes with these flags. About 2x less compile
# time (SmolLM2 at 2x4: 70 s -> 32 s); the kernels built with g++ are unaffected.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def subprocess_env() -> dict[str, str]:
    """This environment for a test's jax subprocess: XLA_FLAGS replaced by
    `TEST_XLA_FLAGS` (the device count is the subprocess's own choice)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = TEST_XLA_FLAGS
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(cmds: list[list[str]], tmp: pathlib.Path, timeout: float) -> list[tuple[str, str]]:
    """Start every command at once (a process waits for its peers in collectives), output
    to files (an undrained pipe could stall one process and its peers with it); their
    (stdout, stderr), each checked for exit status 0."""
    env = subprocess_env()
    files = [(tmp / f"{i}.out", tmp / f"{i}.err") for i in range(len(cmds))]
    procs = []
    try:
        for cmd, (out, err) in zip(cmds, files, strict=True):
            with open(out, "w") as o, open(err, "w") as e:
                procs.append(subprocess.Popen(cmd, stdout=o, stderr=e, text=True, env=env))
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            p.kill()
    texts = [(out.read_text(), err.read_text()) for out, err in files]
    for p, (_, err) in zip(procs, texts, strict=True):
        assert p.returncode == 0, err[-3000:]
    return texts
