"""The `pallax` command line: generation, inspection and clean errors."""

from __future__ import annotations

import pathlib
import shutil
import signal
import subprocess
import sys
import time

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
    # the pipeline compile runs: the default fusion last, unless left out by name
    assert "=== after fuse_projections(" in out and "= linears[3 members]" in out
    args = ["inspect", "--model", str(smollm2_gguf_path), "--passes=bf16,-fuse_projections"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "=== after cast(" in out and "fuse_projections" not in out and "linears" not in out


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
        (["generate", "hi", "--shard", "tensor=0"], "tensor=0 must be a positive integer"),
        (["generate", "hi", "--shard", "tensor=2,pipe=2"], "expected 'tensor=T,data=D'"),
        (["generate", "hi", "--shard", "tensor=2,exact=maybe"], "exact=true|false"),
        (
            ["generate", "hi", "--coordinator", "127.0.0.1:1234"],
            "--coordinator needs --num-processes, --process-id as well",
        ),
        (
            [
                "generate",
                "hi",
                "--coordinator",
                "nohost",
                "--num-processes",
                "2",
                "--process-id",
                "0",
            ],
            "coordinator address 'nohost' must be HOST:PORT",
        ),
        (
            [
                "generate",
                "hi",
                "--coordinator",
                "127.0.0.1:1234",
                "--num-processes",
                "2",
                "--process-id",
                "2",
            ],
            "process_id=2 must be in [0, num_processes=2)",
        ),
        (["generate", "hi", "--local-devices", "4"], "--local-devices applies to a multi-process"),
        (["plan", "llama-3-8b", "--budget-gib", "inf"], "--budget-gib=inf must be positive"),
        (["plan", "llama-3-8b", "--context", "4096"], "--context needs --budget-gib or --cost"),
        (["plan", "llama-3-8b", "--cost", "a100"], "--cost='a100': unknown cost target"),
        (["plan", "llama-3-8b", "--lower", "gpu"], "platforms are cpu, cuda, tpu"),
        (["serve", "smollm2-135m", "--port", "70000"], "--port 70000 must be in [0, 65536)"),
        (["serve", "smollm2-135m", "--draft", "smollm2-135m"], "needs --speculate K"),
        (["serve", "smollm2-135m", "--draft-passes", "int8"], "apply to a --draft model"),
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


def test_cli_top_k_overflow_is_refused_before_loading(capsys):
    assert cli.main(["generate", "hi", "--top-k", str(2**31)]) == 2
    err = capsys.readouterr().err
    assert "top_k=2147483648 must be an integer in [0, 2147483647]" in err


def test_cli_truncated_gguf(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert cli.main(["generate", "hi", "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "is truncated: 8 bytes, shorter than the 24-byte header" in err


def _pallax_command():
    exe = pathlib.Path(sys.executable).parent / "pallax"
    return [str(exe)] if exe.exists() else [shutil.which("pallax") or "pallax"]


def test_cli_invalid_utf8_prompt_names_the_position(smollm2_gguf_path):
    proc = subprocess.run(
        [*_pallax_command(), "generate", b"caf\xe9 au lait", "--model", str(smollm2_gguf_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "pallax: error: the prompt is not valid Unicode: byte 0xe9 at character 3 "
        "(after 'caf'); give UTF-8 text"
    )


@pytest.mark.slow
def test_cli_interrupt_exits_130_with_one_line_at_any_moment(smollm2_gguf_path):
    """Ctrl-C while importing, loading, compiling, in the first prefill and while decoding:
    always exit 130 and one line, never a traceback, a crash or a run that goes on."""
    cmd = [*_pallax_command(), "generate", "Once upon a time", "--model",
           str(smollm2_gguf_path), "--max-new-tokens", "1000", "--ignore-eos"]  # fmt: skip
    for offset in (0.2, 0.6, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.5, 6.0):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(offset)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (offset, proc.returncode, err[-3000:])
        assert err.strip().splitlines()[-1:] == ["pallax: interrupted"], (offset, err[-3000:])
        assert "Traceback" not in err and "Fatal" not in err, (offset, err[-3000:])


@pytest.mark.slow
def test_cli_export_then_run(smollm2_gguf_path, tmp_path):
    """`pallax export` writes an artifact that `pallax run` streams from, as `generate` does."""
    art = tmp_path / "art"
    proc = subprocess.run(
        [*_pallax_command(), "export", str(smollm2_gguf_path), str(art), "--passes", "int8",
         "--cache-sizes", "256", "--prefill-sizes", "16"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"pallax: wrote {art}"
    assert (art / "xla").is_dir()  # the executables for this machine, which `run` uses
    args = ["The capital of France is", "--max-new-tokens", "6"]
    run = subprocess.run([*_pallax_command(), "run", str(art), *args],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    gen = subprocess.run(
        [*_pallax_command(), "generate", *args, "--model", str(smollm2_gguf_path),
         "--passes", "int8"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0 and gen.returncode == 0, run.stderr[-3000:] + gen.stderr[-3000:]
    assert run.stdout == gen.stdout and run.stdout.startswith("The capital of France is Paris")


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "/nonexistent/art", "hi"], "is not a pallax artifact: no manifest.json"),
        (["export", "smollm2-135m", "x", "--cache-sizes", "256,x"], "must be comma-separated"),
        (["run", "/nonexistent/art", "hi", "--top-k", "-1"], "top_k=-1"),
    ],
)
def test_cli_artifact_bad_input(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_plan_reports_memory_per_device(capsys):
    """`pallax plan` sizes a model from its config alone on a mesh this machine lacks."""
    argv = ["plan", "llama-3-8b", "--passes", "int8,kivi2", "--shard", "tensor=8",
            "--budget-gib", "16", "--context", "8192"]  # fmt: skip
    assert cli.main(argv) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert rows["mesh"] == "{'data': 1, 'tensor': 8}"
    whole, per_device = int(rows["weight_bytes"]), int(rows["weight_bytes_per_device"])
    # the norms are replicated
    assert per_device == pytest.approx(whole / 8, rel=2e-3)
    assert float(rows["kv_bytes_per_token_per_device"]) * 8 == float(rows["kv_bytes_per_token"])
    assert int(rows["max_batch"]) > 0


def test_cli_plan_prints_the_roofline_cost(capsys):
    argv = ["plan", "llama-3-8b", "--passes", "int8", "--shard", "tensor=8", "--cost",
            "h100,tpu-v5e", "--batch", "8", "--context", "4096"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "decode: batch 8 x 1 tokens, cache 4096 (per device)" in out
    total = next(line for line in out.splitlines() if line.startswith("total")).split()
    h100, v5e = float(total[-2]), float(total[-1])
    assert 0 < h100 < v5e  # microseconds per step; the H100 has 4x the bandwidth


@pytest.mark.slow
def test_cli_serve_answers_on_loopback_and_stops_on_sigint(smollm2_gguf_path):
    import urllib.request

    from tests.conftest import cli_server, post_json

    draft = ["--speculate", "3", "--draft", smollm2_gguf_path, "--draft-keep-quantized"]
    paged = ["--kv-pages", "12"]  # 9 pages of 16 hold one request of 128 + 3 drafts
    with cli_server(smollm2_gguf_path, "--max-batch", "2", "--max-len", "128", *draft,
                    *paged) as url:  # fmt: skip
        # the GGUF-native model drafts for the float one, over a paged cache
        out = post_json(url + "/v1/completions", {"model": "s", "prompt": "The capital of "
                        "France is", "max_tokens": 3, "temperature": 0})  # fmt: skip
        assert out["choices"][0]["text"].startswith(" Paris")
        assert out["usage"]["completion_tokens"] == 3
        metrics = urllib.request.urlopen(url + "/metrics", timeout=60).read().decode()
        assert "pallax_drafted_tokens_total 3" in metrics, metrics
        assert "pallax_kv_pages 12" in metrics and "pallax_kv_pages_used " in metrics
