"""benchmarks/gpu_check.sh --dry-run: every stage of the prepared GPU check runs on the CPU and
leaves the files the device tool brings back (at most 8, plain names). Slow (about 90 s): run it
after changing the script or a benchmark it calls, before the one GPU call."""

import json
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow

FILES = ["1_setup.txt", "2_pytest.txt", "3_resume.txt", "4_throughput.json", "5_memory.json",
         "6_hellaswag.txt", "7_dashboard.txt", "8_logs.tar"]


def test_dry_run_of_every_stage(tmp_path):
    if not (SHARED_DATA / "hellaswag" / "hellaswag_val.jsonl").exists() or shutil.which("timeout") is None:
        pytest.skip("needs ../shared/data and coreutils' timeout")
    if not (REPO / ".gpucheck" / "wheels").is_dir():
        prep = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_prepare.sh")], capture_output=True, text=True,
                              timeout=300)
        if prep.returncode != 0:
            pytest.skip(f"gpu_prepare.sh could not fetch the wheels here: {prep.stderr[-300:]}")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in FILES)
    stages = re.findall(r"^stage (\w+): exit (\d+)", proc.stdout, re.M)
    assert [name for name, _ in stages] == ["setup", "pytest", "resume", "throughput", "memory", "hellaswag",
                                            "dashboard"]
    assert all(code == "0" for _, code in stages), proc.stdout
    assert "straight_vs_resumed_deterministic_false: equal" in proc.stdout
    assert "straight_vs_resumed_deterministic_true: equal" in proc.stdout
    tp = json.loads((out / "4_throughput.json").read_text())["gpt2_124m_bf16"]
    assert set(tp["contenders"]) == {"lmkit", "lmkit+compile", "nanogpt", "nanogpt+compile"}
    mem = json.loads((out / "5_memory.json").read_text())
    assert mem["dry_run"] is True and len(mem["rows"]) == 2
    assert '"items_per_s"' in (out / "6_hellaswag.txt").read_text()
    assert "# last screen" in (out / "7_dashboard.txt").read_text()
    report = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_report.py"), str(out)],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "| default | yes |" in report.stdout and "| deterministic | yes |" in report.stdout
    assert "| lmkit+compile |" in report.stdout and "| tiny | 2 | fp32 | off |" in report.stdout
    with tarfile.open(out / "8_logs.tar") as tar:
        names = tar.getnames()
    assert "logs/summary.txt" in names and "logs/profile/trace_gpt2_124m.json.gz" in names
