"""``benchmarks/train_throughput.py --gpt2-124m``: the JSON of its CPU dry run and its refusals.

Timings are not tested (the CPU is shared); the arithmetic and the keys the GPU check reads are.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"

# a tiny shape: layers, heads, width, block, batch, vocab
L, H, D, T, B, V = 1, 2, 32, 16, 2, 512


def _flops_per_token_by_hand() -> float:
    """PaLM appendix B / nanoGPT's estimate_mfu: 6 N + 12 L d T, N the matmul weights: per
    block qkv 3d^2 + proj d^2 + fc 4d^2 + fc2 4d^2 = 12 d^2, and the tied head V d once."""
    n = L * 12 * D * D + V * D
    return 6.0 * n + 12.0 * L * D * T


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prof")
    env = {**os.environ, "LMKIT_PEAK_FLOPS": "1e12", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--skip-small", "--gpt2-124m",
           "--gpt2-shape", f"{L},{H},{D},{T},{B},{V}", "--gpt2-contenders", "lmkit,nanogpt",
           "--gpt2-rounds", "2", "--gpt2-steps", "1", "--gpt2-warmup", "1", "--json", "--profile", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout), out


def test_dry_run_reports_each_contender_against_one_flops_per_token(dry_run):
    report, _ = dry_run
    assert "tok_per_s" not in report  # --skip-small
    g = report["gpt2_124m_bf16"]
    assert g["shape"]["n_layer"] == L and g["shape"]["batch"] == B and g["shape"]["vocab"] == V
    assert not g["shape"]["gpt2_124m"]
    assert g["peak_flops"] == 1e12 and g["peak_name"] == "LMKIT_PEAK_FLOPS"
    assert g["flops_per_token"] == pytest.approx(_flops_per_token_by_hand(), rel=1e-12)
    assert set(g["contenders"]) == {"lmkit", "nanogpt"}
    for c in g["contenders"].values():
        assert len(c["rounds"]) == 2 and c["tok_per_s"] > 0
        assert c["compile_s"] is None  # eager
        assert c["mfu"] == pytest.approx(c["tok_per_s"] * _flops_per_token_by_hand() / 1e12, rel=1e-9)
    assert g["ratio_compiled_lmkit_over_nanogpt"] is None  # no compiled contenders in this run
    assert g["ratio_eager_lmkit_over_nanogpt"] == pytest.approx(
        g["contenders"]["lmkit"]["tok_per_s"] / g["contenders"]["nanogpt"]["tok_per_s"])
    assert set(g["references"]) == {"nanoGPT A100", "nanochat H100"}


def test_dry_run_writes_the_profile(dry_run):
    report, out = dry_run
    p = report["gpt2_124m_bf16"]["profile"]
    assert p["contender"] == "lmkit" and p["sort_by"] == "self_cpu_time_total"
    trace = out / "trace_gpt2_124m.json.gz"
    assert p["trace"] == str(trace) and p["trace_bytes"] == trace.stat().st_size < 16 * 2**20
    with gzip.open(trace, "rt") as f:
        assert json.load(f)["traceEvents"]
    table = (out / "profile_gpt2_124m.txt").read_text()
    assert "Self CPU" in table and "ProfilerStep" in table


def _main(argv, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports its sibling modules
    import train_throughput

    return train_throughput.main(argv)


@pytest.mark.parametrize(("argv", "message"), [
    (["--gpt2-124m"], "needs CUDA"),
    (["--gpt2-124m", "--gpt2-shape", "2,3,64,64,2"], "multiple of N_HEAD"),
    (["--gpt2-124m", "--gpt2-shape", "2,2,64"], "N_LAYER,N_HEAD,N_EMBD,BLOCK,BATCH"),
    (["--gpt2-124m", "--gpt2-shape", "2,2,64,64,2", "--gpt2-contenders", "lmkit,jax"], "unknown jax"),
    (["--profile", "/tmp/x"], "go with --gpt2-124m"),
])
def test_bad_flags_are_refused_in_one_line(argv, message, monkeypatch):
    with pytest.raises(SystemExit) as info:
        _main(["--device", "cpu", *argv], monkeypatch)
    text = str(info.value)
    assert message in text and "\n" not in text


@pytest.mark.slow
def test_the_gpu_command_dry_run_with_compile(tmp_path):
    """The GPU check's command with the CPU substitutions: all four contenders, two compiles
    (~15 s with a warm Inductor cache on 2 cores, ~70 s cold)."""
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--skip-small", "--gpt2-124m",
           "--gpt2-shape", "2,2,64,64,2", "--json", "--profile", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    g = json.loads(proc.stdout)["gpt2_124m_bf16"]
    assert list(g["contenders"]) == ["lmkit", "lmkit+compile", "nanogpt", "nanogpt+compile"]
    for name, c in g["contenders"].items():
        assert "error" not in c, c
        assert (c["compile_s"] is not None) == name.endswith("+compile")
        assert (c["graphs_compiled"] > 0) == name.endswith("+compile")
    assert g["ratio_compiled_lmkit_over_nanogpt"] > 0 and g["recompiles_while_timing"] == 0
    assert g["profile"]["contender"] in ("lmkit", "lmkit+compile")
    assert (tmp_path / "trace_gpt2_124m.json.gz").exists() and (tmp_path / "profile_gpt2_124m.txt").exists()


def test_a_failing_contender_is_reported_and_the_others_still_run(monkeypatch):
    """One shot on the GPU: a contender that fails (say its compile) must not cost the others."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import train_throughput_gpt2 as gpt2

    real = gpt2.build_contender

    def build(name, shape, device):
        step = real(name, shape, device)
        if name != "nanogpt":
            return step

        def broken(x, y):
            raise RuntimeError("no Triton here")
        return broken

    monkeypatch.setattr(gpt2, "build_contender", build)
    import torch

    shape = gpt2.parse_shape(f"{L},{H},{D},{T},{B},{V}")
    report, steps, _ = gpt2.time_gpt2(shape, ["lmkit", "nanogpt"], torch.device("cpu"), rounds=1, steps=1, warmup=1)
    assert report["contenders"]["nanogpt"]["error"] == "RuntimeError: no Triton here"
    assert report["contenders"]["nanogpt"]["tok_per_s"] is None and list(steps) == ["lmkit"]
    assert report["contenders"]["lmkit"]["tok_per_s"] > 0
    assert report["ratio_eager_lmkit_over_nanogpt"] is None
