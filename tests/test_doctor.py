"""`lmkit doctor`: environment report, parameter counts, memory table, verdicts, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import torch
from typer.testing import CliRunner

from lmkit.cli import app
from lmkit.config import build_run_config
from lmkit.models import build_model

from conftest import run_cli

ENV = {"COLUMNS": "220"}


def doctor(*args: str):
    return CliRunner().invoke(app, ["doctor", *args], env=ENV)


def test_environment_table_in_a_real_subprocess(tmp_path):
    proc = run_cli("doctor", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for item in ("Environment", "python", "torch", "CUDA (torch build)", "cuDNN", "NVIDIA driver (NVML)",
                 "CUDA available", "Apple MPS", "CPUs", "RAM", torch.__version__):
        assert item in out, item
    if not torch.cuda.is_available():
        assert "GPUs: none visible" in out


def test_json_has_the_keys_of_a_bug_report():
    result = doctor("--json", "--preset", "small", "--batch-size", "32", "--gpu-memory", "16GiB")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    env = report["environment"]
    for key in ("python", "torch", "cuda", "cudnn", "driver", "cuda_available", "gpus", "mps_available",
                "cpu_count", "ram_total_bytes", "ram_available_bytes"):
        assert key in env, key
    assert env["torch"] == torch.__version__
    assert env["cpu_count"] >= 1 and env["ram_total_bytes"] > 0
    assert set(report["params"]) >= {"total", "trainable", "embeddings", "non_embedding", "target"}
    mem = report["memory"]
    assert mem["batch_size"] == 32 and mem["seq_len"] == 512 and mem["precision"] == "fp32"
    names = [row["name"] for row in mem["rows"]]
    for name in ("weights", "gradients", "optimizer state", "activations", "  of which attention scores",
                 "logits + loss"):
        assert name in names
    assert mem["total"] == mem["peak_allocated"] + mem["overhead"]
    card = report["verdicts"][-1]
    assert card["gpu"] == "--gpu-memory 16GiB" and card["capacity_bytes"] == 16 * 2**30
    assert card["verdict"] in ("fits", "tight", "does not fit")


@pytest.mark.parametrize("preset", ["scale_10m", "transformer-europarl"])
def test_param_count_equals_the_models(preset):
    report = json.loads(doctor("--json", "--preset", preset).stdout)
    config = build_run_config(preset)
    model_cfg = config.model.model_copy()
    model_cfg.vocab_size = report["preset"]["vocab_size"]
    model = build_model(model_cfg, device="meta")
    assert report["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert report["params"]["trainable"] == report["params"]["total"]
    embeddings = model.transformer.wte.weight.numel() + (
        model.transformer.wpe.weight.numel() if "wpe" in model.transformer else 0)
    assert report["params"]["embeddings"] == embeddings
    untied = 0 if model_cfg.tie_embeddings else model.lm_head.weight.numel()
    assert report["params"]["head"] == untied
    assert report["params"]["non_embedding"] == report["params"]["total"] - embeddings - untied


def test_scale_10m_reports_the_difference_from_its_target_like_seed_000():
    result = doctor("--preset", "scale_10m")
    assert result.exit_code == 0, result.stderr
    assert "Total parameters: 10,651,776 (10.65M)" in result.stdout
    assert "Difference from 10M target: 6.5%" in result.stdout


def test_done_when_small_b32_on_a_16gib_card():
    result = doctor("--preset", "small", "--batch-size", "32", "--gpu-memory", "16GiB")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "Memory of one training step: B=32, T=512, fp32" in out
    for row in ("weights", "gradients", "optimizer state", "activations", "of which attention scores",
                "logits + loss", "peak allocated", "framework overhead", "total"):
        assert row in out, row
    # fp32 small at B=32 needed ~17 GiB while the training step held the 50,257-way logits; the model
    # no longer keeps them when given targets (issue 9, item 9: -3.1 GiB), so it fits, with 36 the largest batch
    assert "--gpu-memory 16GiB" in out and "does not fit" not in out and "What to try" not in out
    report = json.loads(doctor("--json", "--preset", "small", "--batch-size", "32", "--gpu-memory", "16GiB").stdout)
    assert report["verdicts"][-1]["max_batch_size"] == 36
    # B=48 does not fit, and doctor says what would make it fit
    out = doctor("--preset", "small", "--batch-size", "48", "--gpu-memory", "16GiB").stdout
    assert "does not fit" in out
    assert "What to try on --gpu-memory 16GiB" in out and "--bf16" in out and "--grad-checkpointing" in out


def test_largest_batch_in_the_verdict_is_consistent_with_the_estimate():
    from lmkit.analysis.memory import estimate_memory

    report = json.loads(doctor("--json", "--preset", "tiny", "--gpu-memory", "8GiB", "--bf16").stdout)
    card = report["verdicts"][-1]
    best = card["max_batch_size"]
    config = build_run_config("tiny")
    cfg = config.model.model_copy()
    cfg.vocab_size = 50257
    assert estimate_memory(cfg, best, precision="bf16").total <= 8 * 2**30
    assert estimate_memory(cfg, best + 1, precision="bf16").total > 8 * 2**30


@pytest.mark.parametrize("flag", ["--legacy-hand-table", "--legacy-seed001"])  # the old name still works
def test_legacy_hand_table_view_reproduces_the_guides_table(flag):
    result = doctor("--preset", "medium", "--batch-size", "8", flag)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "The WikiText GPT guide's hand table" in out
    for line in ("0.50 GB", "1.00 GB", "7.55 GB", "4.83 GB", "1.50 GB", "11.04 GB"):
        assert line in out, line
    assert "the guide's formula at B = 8 / 16 / 32: 11.04 / 18.59 / 33.69 GB" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_only_without_cuda_exits_3(tmp_path):
    proc = run_cli("doctor", "--gpu-only", cwd=tmp_path, env=ENV)
    assert proc.returncode == 3
    assert proc.stderr.startswith("error: --gpu-only: CUDA is not available")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("bad", ["lots", "16XB", "-4GiB", "0"])
def test_bad_gpu_memory_is_one_line_and_exit_2(bad):
    result = doctor("--preset", "small", "--gpu-memory", bad)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: --gpu-memory {bad!r}")
    assert result.stderr.count("\n") == 1


def test_estimate_flags_without_a_preset_are_bad_input():
    result = doctor("--batch-size", "8")
    assert result.exit_code == 2
    assert "add --preset" in result.stderr


# ------------------------------------------------------------------------------ CPU load (issue 17)


def test_oversubscription_warning_text():
    from lmkit.analysis.environment import BusyProcess, oversubscription_warning

    assert oversubscription_warning(1.0, 2, 2) == (
        "other processes keep ~1.0 of 2 cores busy; torch's 2 threads will spin-wait for them (training can run "
        "several times slower): a new lmkit train picks fewer threads itself; pass --threads 1 to a resume or "
        "another torch program, or stop the other work")
    top = [BusyProcess(pid=4242, name="python", cpu_percent=99.4)]
    assert oversubscription_warning(3.2, 16, 16, top).endswith(
        "--threads 13 to a resume or another torch program, or stop the other work (busiest: python, pid 4242, "
        "99% of a core)")
    assert oversubscription_warning(0.1, 2, 2) is None  # an idle machine's daemons
    assert oversubscription_warning(1.0, 2, 1) is None  # one thread fits beside one busy process


def test_doctor_names_a_busy_process_and_warns_that_the_cpu_is_oversubscribed():
    usable = len(os.sched_getaffinity(0))
    saved = torch.get_num_threads()
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        torch.set_num_threads(usable)  # torch's default: one thread per usable core
        time.sleep(0.3)  # the loop is spinning
        spun0, t0 = sum(psutil.Process(child.pid).cpu_times()[:2]), time.perf_counter()
        report = json.loads(doctor("--json").stdout)
        spun = (sum(psutil.Process(child.pid).cpu_times()[:2]) - spun0) / (time.perf_counter() - t0)
        out = doctor().stdout
    finally:
        child.kill()
        child.wait()
        torch.set_num_threads(saved)
    assert spun >= 0.5  # the reference: the child's own CPU time says it kept a core (mostly) busy
    load = report["environment"]["cpu_load"]
    assert load["usable_cores"] == usable and load["threads"] == usable and len(load["load_avg"]) == 3
    assert load["sample_s"] >= 0.2 and load["other_busy_cores"] >= 0.5 and load["busy_cores"] >= 0.5
    mine = [p for p in load["top"] if p["pid"] == child.pid]
    assert mine and mine[0]["cpu_percent"] >= 50 and mine[0]["name"].startswith("python")
    assert load["oversubscribed"] is True
    assert f"of {usable} cores busy; torch's {usable} threads will spin-wait" in load["warning"]
    assert "--threads" in load["warning"] and "stop the other work" in load["warning"]
    assert "load average" in out and "other processes' CPU" in out and f"(pid {child.pid})" in out
    assert "warning: other processes keep ~" in out and "pass --threads" in out


def test_an_idle_machine_gets_no_cpu_warning():
    import re

    from lmkit.analysis.environment import sample_cpu_load

    if sample_cpu_load(0.2, threads=1).other_busy_cores > 0.25:
        pytest.skip("the machine is busy now: other processes keep a core partly busy")
    load = json.loads(doctor("--json").stdout)["environment"]["cpu_load"]
    if load["other_busy_cores"] > 0.25:
        pytest.skip("the machine became busy during the test")
    assert load["oversubscribed"] is False and load["warning"] is None
    out = doctor().stdout
    busy = float(re.search(r"other processes' CPU\s*│\s*~([0-9.]+) of", out).group(1))
    if busy <= 0.25:  # this sample, too, found the machine idle
        assert "warning:" not in out
