"""Data-parallel training (DDP over gloo, 2 CPU processes): the same steps as one process,
files from rank 0 only, an agreed stop on a signal to one rank, and an exact resume.

Every run is a real ``python -m lmkit`` process (under ``torch.distributed.run``, or two
processes given torchrun's environment by hand so each one's exit code can be read), on the
padded arithmetic task: its micro-batches hold different numbers of targets, so a loss that
is not weighted by the *global* target count gives other updates than one process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmkit.training.checkpoint import load_checkpoint

from conftest import TINY_PRESET

ENV = {"OMP_NUM_THREADS": "1", "LMKIT_THREADS": "1"}


def _preset(tmp_path: Path, dropout: float = 0.0) -> Path:
    text = TINY_PRESET.format(pos="rope", steps=8, eval_interval="null", ckpt_interval="null")
    text = text.replace("dropout: 0.0", f"dropout: {dropout}").replace("log_interval: 5", "log_interval: 1")
    path = tmp_path / f"tiny_{dropout}.yaml"
    path.write_text(text)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_ranks(args: list[str], cwd: Path, rank_env: dict[int, dict[str, str]] | None = None,
               timeout: int = 90) -> list[subprocess.CompletedProcess]:
    """``python -m lmkit ARGS`` as ranks 0 and 1 of a 2-process job (torchrun's variables)."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, **ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               **((rank_env or {}).get(rank, {}))}
        procs.append(subprocess.Popen([sys.executable, "-m", "lmkit", *args], cwd=cwd, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hang is a failure, never a stuck test run
            for p in procs:
                p.kill()
            raise
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out


def _train_args(preset: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--preset", str(preset), "--out-dir", str(runs), "--name", name, "--device", "cpu",
            "--no-tui", *extra]


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "latest.pt")["model"]


@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_equal_one_rank_with_accumulation(tmp_path, accum):
    """2 ranks x batch B x accumulation a (torchrun) == 1 process x batch B x accumulation 2a,
    on padded data (a = 2: ``no_sync`` on the first micro-batch of each rank's window); only
    rank 0 wrote the run folder."""
    preset, runs = _preset(tmp_path), tmp_path / "runs"
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "lmkit", *_train_args(preset, runs, "ddp", "--set",
                                                      f"training.grad_accum_steps={accum}")],
                         cwd=tmp_path, text=True, capture_output=True, env={**os.environ, **ENV}, timeout=120)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "lmkit", *_train_args(preset, runs, "one", "--set",
                                                                      f"training.grad_accum_steps={2 * accum}")],
                         cwd=tmp_path, text=True, capture_output=True, env={**os.environ, **ENV}, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]

    a, b = _losses(runs / "ddp"), _losses(runs / "one")
    assert len(a) == len(b) == 8
    assert a == pytest.approx(b, abs=1e-6, rel=0)
    wa, wb = _weights(runs / "ddp"), _weights(runs / "one")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0, msg=key)

    summary = json.loads((runs / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 32 * accum
    assert summary["tokens"] == json.loads((runs / "one" / "summary.json").read_text())["tokens"]  # global
    state = load_checkpoint(runs / "ddp" / "checkpoints" / "latest.pt")
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    # rank 0 alone writes: one TensorBoard file, one start record, one metrics record per step
    assert len(list((runs / "ddp" / "tb").iterdir())) == 1
    events = [json.loads(line) for line in (runs / "ddp" / "events.jsonl").read_text().splitlines()]
    assert sum(e["kind"] == "run_started" for e in events) == 1
    assert sorted(p.name for p in (runs / "ddp").iterdir()) == sorted(p.name for p in (runs / "one").iterdir())
    assert f"global batch {32 * accum} sequences" in ddp.stdout


def test_sigterm_to_one_rank_stops_both_and_resume_is_exact(tmp_path):
    """SIGTERM to rank 1 only (after step 3): both ranks stop after step 4 with exit 143 and one
    checkpoint; ``lmkit resume`` on 2 processes then ends bitwise where an uninterrupted
    2-process run ends (dropout 0.1: every rank's RNG state is restored)."""
    preset, runs = _preset(tmp_path, dropout=0.1), tmp_path / "runs"
    full = _two_ranks(_train_args(preset, runs, "full"), tmp_path)
    assert [p.returncode for p in full] == [0, 0], full[0].stderr[-2000:] + full[1].stderr[-2000:]

    # micro_step counts global micro-batches (2 per step here): 6 is the end of step 3
    cut = _two_ranks(_train_args(preset, runs, "cut"), tmp_path, {1: {"LMKIT_TEST_SIGNAL": "6:SIGTERM"}})
    assert [p.returncode for p in cut] == [143, 143], cut[0].stderr[-2000:] + cut[1].stderr[-2000:]
    assert "stopped by SIGTERM at step 4" in cut[0].stderr
    assert sorted(p.name for p in (runs / "cut" / "checkpoints").iterdir()) == ["latest.pt"]
    assert load_checkpoint(runs / "cut" / "checkpoints" / "latest.pt")["step"] == 4

    resumed = _two_ranks(["resume", str(runs / "cut"), "--no-tui"], tmp_path)
    assert [p.returncode for p in resumed] == [0, 0], resumed[0].stderr[-2000:] + resumed[1].stderr[-2000:]
    assert _losses(runs / "cut") == _losses(runs / "full")
    wa, wb = _weights(runs / "cut"), _weights(runs / "full")
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key

    # one process continues the 2-process run with doubled accumulation: the same global batch
    one = subprocess.run([sys.executable, "-m", "lmkit", "resume", str(runs / "cut"), "--max-steps", "10",
                          "--no-tui"], cwd=tmp_path, text=True, capture_output=True, env={**os.environ, **ENV},
                         timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    assert ("resumed on 1 process (one process) from a checkpoint of 2 (ddp), loaded: training.grad_accum_steps "
            "1 -> 2 per rank keeps the global batch of 2 micro-batches; the continuation is not bitwise") in one.stdout
    state = load_checkpoint(runs / "cut" / "checkpoints" / "latest.pt")
    assert state["step"] == 10 and state["micro_step"] == 20 and state["world_size"] == 1  # 2 micro-batches a step
    assert state["config"]["training"]["grad_accum_steps"] == 2
    assert len(_losses(runs / "cut")) == 10


@pytest.mark.parametrize(("setting", "message"), [
    (["training.parallelism=fsdp", "training.optimizer=muon"],
     "error: training.optimizer: muon is not yet supported with training.parallelism: fsdp"),
    (["svd.enabled=true", "svd.targets=[transformer.h.0.attn.c_attn]"], "error: svd: not yet supported with 2 processes"),
])
def test_unsupported_combinations_are_refused_in_one_line(tmp_path, setting, message):
    """Muon under FSDP and the adaptive-SVD hook (it swaps modules under DDP) are refused on every rank
    before any step, in one line, and no run folder is left behind."""
    preset, runs = _preset(tmp_path), tmp_path / "runs"
    sets = [arg for item in setting for arg in ("--set", item)]
    procs = _two_ranks(_train_args(preset, runs, "f", *sets), tmp_path)
    assert [p.returncode for p in procs] == [2, 2], procs[0].stderr[-2000:]
    assert procs[0].stderr.strip().splitlines()[-1].startswith(message)
    assert not (runs / "f").exists()
