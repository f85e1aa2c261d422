"""The `pallax` command line: generation, inspection and clean errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pallax.scripts import cli


def _run(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "pallax.scripts.cli", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_generate_streams_continuation(smollm2_gguf_path):
    proc = _run("generate", "The capital of France is", "--model", str(smollm2_gguf_path),
                "--max-new-tokens", "6")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The capital of France is Paris")


def test_cli_inspect_prints_before_and_after(smollm2_gguf_path, capsys):
    assert cli.main(["inspect", "--model", str(smollm2_gguf_path), "--passes", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "=== input ===" in out and "=== after cast(" in out
    assert "bfloat16[1,1,576] = linear" in out and "attention[" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["generate", "hi", "--model", "/nonexistent/x.gguf"], "not found"),
        (["generate", "hi", "--passes", "quantum"], "unknown pass 'quantum'"),
        (["generate", "hi", "--temperature", "-1"], "temperature=-1.0"),
        (["generate", "hi", "--top-p", "0"], "top_p=0.0"),
        (["generate", "hi", "--top-k", "-2"], "top_k=-2"),
        (["generate", "", "--max-new-tokens", "4"], "prompt is empty"),
        (["generate", "hi", "--max-new-tokens", "0"], "max-new-tokens=0"),
    ],
)
def test_cli_bad_input_exits_nonzero_without_traceback(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_non_gguf_file(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf at all")
    assert cli.main(["generate", "hi", "--model", str(bad)]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err
