"""``lmkit train --nproc-per-node N``: torch's elastic launcher in-process (gloo, 2 CPU processes).

Each run is a real ``python -m lmkit`` launcher process whose workers run the same command line.
The references are independent of the launcher: a 1-process run with accumulation 2 (the same
global batch, test_ddp shows torchrun gives it too) and an uninterrupted launcher run. Worker
failures are placed deterministically with the launcher's test hook
(``LMKIT_TEST_LAUNCH_SIGNAL=RANK:ATTEMPT:MICRO:SIGNAME``: that worker of that attempt signals
itself after global micro-batch MICRO); every wait has a timeout, so a hang fails the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lmkit.training.checkpoint import load_checkpoint

from conftest import TINY_PRESET

ENV = {"OMP_NUM_THREADS": "1", "LMKIT_THREADS": "1"}
TIMEOUT = 120


def _preset(folder: Path, ckpt_interval: str = "2") -> Path:
    text = TINY_PRESET.format(pos="rope", steps=8, eval_interval="null", ckpt_interval=ckpt_interval)
    path = folder / f"tiny_{ckpt_interval}.yaml"
    path.write_text(text.replace("log_interval: 5", "log_interval: 1"))
    return path


def _args(preset: Path, runs: Path, name: str | None, *extra: str) -> list[str]:
    named = ["--name", name] if name else []  # None: the default, timestamped name
    return [sys.executable, "-m", "lmkit", "train", "--preset", str(preset), "--out-dir", str(runs), *named,
            "--device", "cpu", "--no-tui", *extra]


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, text=True, capture_output=True, env={**os.environ, **ENV, **env},
                          timeout=TIMEOUT)  # a hang raises TimeoutExpired: a failure


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "latest.pt")["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted ``lmkit train --nproc-per-node 2`` run (8 steps, checkpoints every 2)."""
    folder = tmp_path_factory.mktemp("launch")
    preset, runs = _preset(folder), folder / "runs"
    env = {**os.environ, **ENV}
    procs = [subprocess.Popen(args, cwd=folder, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for args in (_args(preset, runs, None, "--nproc-per-node", "2"),  # at once: the CPUs wait on imports
                          _args(preset, folder / "one", "one", "--set", "training.grad_accum_steps=2"))]
    try:
        out = [subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=TIMEOUT)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:  # a hang: fail, and leave nothing running
                p.kill()
                p.communicate()
    for p, result in zip(procs, out, strict=True):
        assert p.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return folder, preset, runs, out[0]


def test_launch_equals_one_process_with_accumulation(reference):
    """2 launched workers x batch B == 1 process x batch B x accumulation 2: the same per-step
    losses (1e-6) and final weights (1e-5); the launcher claimed one run folder, which holds
    what a 1-process run's holds, written once (one run start, one TensorBoard file)."""
    folder, preset, runs, proc = reference
    assert "launch: 2 worker processes" in proc.stdout
    # the folder the launcher claimed (a timestamped name) is the run's, and the only one
    claimed = Path(re.search(r"; run folder (\S+)\n", proc.stdout).group(1))
    assert [p.name for p in runs.iterdir()] == [claimed.name]
    ref, one = runs / claimed.name, folder / "one" / "one"
    assert f"run {claimed.name} -> {claimed}" in proc.stdout  # the workers' header: the same folder
    a, b = _losses(ref), _losses(one)
    assert len(a) == len(b) == 8
    assert a == pytest.approx(b, abs=1e-6, rel=0)
    wa, wb = _weights(ref), _weights(one)
    for key in wb:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0, msg=key)
    assert sorted(p.name for p in ref.iterdir()) == sorted(p.name for p in one.iterdir())
    assert sum(e["kind"] == "run_started" for e in _events(ref)) == 1
    assert len(list((ref / "tb").iterdir())) == 1
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"


def test_killed_worker_restarts_and_resumes_the_same_run(reference):
    """Rank 1 SIGKILLed in step 3 (attempt 0 only) with --max-restarts 1: the agent restarts both
    workers, they resume the same folder from its newest checkpoint (step 2) and end bitwise
    where the uninterrupted run ends."""
    folder, preset, runs, _ = reference
    ref = next(runs.iterdir())
    killed = folder / "killed"
    proc = _run(_args(preset, killed, None, "--nproc-per-node", "2", "--max-restarts", "1"), folder,
                LMKIT_TEST_LAUNCH_SIGNAL="1:0:6:SIGKILL")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "killed by SIGKILL; restarting the workers" in proc.stdout
    (run,) = killed.iterdir()  # one folder: the restarted workers claimed none of their own
    assert proc.stdout.count(f"run {run.name} -> ") == 2  # both attempts' headers name it
    resumed = [e for e in _events(run) if e["kind"] == "resumed" and not e.get("superseded")]
    assert [e["step"] for e in resumed] == [2]
    assert _losses(run) == _losses(ref)
    wa, wb = _weights(run), _weights(ref)
    for key in wb:
        assert torch.equal(wa[key], wb[key]), key
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_worker_killed_before_the_first_checkpoint_starts_the_run_again_in_its_folder(reference):
    """Rank 1 SIGKILLed in step 1, before any checkpoint: the restarted workers start the run
    again in the same folder (the first attempt's records moved to ``superseded/``) and end
    bitwise where the uninterrupted run ends."""
    folder, preset, runs, _ = reference
    early = folder / "early"
    proc = _run(_args(preset, early, "early", "--nproc-per-node", "2", "--max-restarts", "1"), folder,
                LMKIT_TEST_LAUNCH_SIGNAL="1:0:2:SIGKILL")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "killed by SIGKILL; restarting the workers" in proc.stdout
    (run,) = early.iterdir()
    assert not [e for e in _events(run) if e["kind"] == "resumed"]
    assert (run / "superseded" / "metrics.jsonl").exists()
    ref = next(runs.iterdir())
    assert _losses(run) == _losses(ref)
    wa, wb = _weights(run), _weights(ref)
    for key in wb:
        assert torch.equal(wa[key], wb[key]), key


def _pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` waits, undelivered, for the (stopped) process ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigPnd", "ShdPnd")) and int(line.split()[1], 16) & (1 << (signum - 1)):
            return True
    return False


def _wait(condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_sigterm_to_the_launcher_stops_with_one_checkpoint(tmp_path, reference):
    """SIGTERM to the launcher (as SLURM sends it), with a restart allowed: it reaches both
    workers, they agree on one step, write one checkpoint and exit 143; the launcher exits 143
    and restarts nothing. The workers pause themselves (SIGSTOP) in step 3 so that the signal
    lands mid-run at a known point; they are continued once it is pending in both. Then
    ``lmkit resume RUN --nproc-per-node 2`` ends bitwise where the uninterrupted run ends."""
    psutil = pytest.importorskip("psutil")
    preset, runs = _preset(tmp_path, ckpt_interval="null"), tmp_path / "runs"
    launcher = subprocess.Popen(_args(preset, runs, "term", "--nproc-per-node", "2", "--max-restarts", "1"),
                                cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, **ENV, "LMKIT_TEST_LAUNCH_SIGNAL": "*:0:6:SIGSTOP"})
    try:
        me = psutil.Process(launcher.pid)

        def paused() -> bool:
            assert launcher.poll() is None, launcher.communicate()
            kids = me.children()
            return len(kids) == 2 and all(k.status() == psutil.STATUS_STOPPED for k in kids)

        _wait(paused, "both workers to pause in step 3")
        workers = me.children()
        launcher.send_signal(signal.SIGTERM)
        _wait(lambda: all(_pending(w.pid, signal.SIGTERM) for w in workers), "the launcher to signal the workers")
        for worker in workers:
            os.kill(worker.pid, signal.SIGCONT)
        stdout, stderr = launcher.communicate(timeout=TIMEOUT)
    finally:
        if launcher.poll() is None:  # never leave a stuck job behind
            for proc in psutil.Process(launcher.pid).children(recursive=True):
                proc.kill()
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode == 143, stdout[-2000:] + stderr[-3000:]
    run = runs / "term"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.pt"]
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 4
    assert stderr.count("stopped by SIGTERM at step 4") == 2  # both workers, the same step
    assert "restarting" not in stdout + stderr
    assert sum(e["kind"] == "run_started" for e in _events(run)) == 1
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"

    resumed = _run([sys.executable, "-m", "lmkit", "resume", str(run), "--no-tui", "--nproc-per-node", "2"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    ref = next(reference[2].iterdir())  # the same preset but for the checkpoint interval
    assert _losses(run) == _losses(ref)
    wa, wb = _weights(run), _weights(ref)
    for key in wb:
        assert torch.equal(wa[key], wb[key]), key


def test_a_stop_or_bad_input_spends_no_restart(monkeypatch):
    """lmkit's agent: a worker that exited 143/130 (a stop), 2 (bad input) or 3 (the machine cannot:
    no CUDA for --gpu-only, out of memory) leaves no restart for torch's agent loop; a crash or a
    killed worker keeps them."""
    from torch.distributed.elastic.agent.server.api import RunResult, WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from lmkit.cli.launch import _agent_class

    agent_cls = _agent_class()
    for code, left in ((143, 0), (130, 0), (2, 0), (3, 0), (-9, 2), (1, 2)):
        failure = ProcessFailure(local_rank=1, pid=1234, exitcode=code, error_file="")
        monkeypatch.setattr(LocalElasticAgent, "_monitor_workers",
                            lambda self, group, f=failure: RunResult(state=WorkerState.FAILED, failures={1: f}))
        agent = object.__new__(agent_cls)
        agent._remaining_restarts = 2
        agent.out = open(os.devnull, "w")  # noqa: SIM115
        assert agent._monitor_workers(None).state == WorkerState.FAILED
        assert agent._remaining_restarts == left, code
        agent.out.close()


@pytest.mark.parametrize(("args", "env", "message"), [
    (["train", "--nproc-per-node", "0"], {}, "error: --nproc-per-node 0: needs at least 1 process"),
    (["train", "--max-restarts", "1"], {}, "error: --max-restarts needs --nproc-per-node N"),
    (["train", "--nproc-per-node", "2"], {"WORLD_SIZE": "2"}, "error: --nproc-per-node: already inside a launcher"),
    (["train", "--nproc-per-node", "2", "--device", "cuda"], {"CUDA_VISIBLE_DEVICES": ""},
     "error: --nproc-per-node 2 with --device cuda: only 0 GPU(s) visible"),
    (["resume", "nope", "--nproc-per-node", "2"], {"WORLD_SIZE": "2"}, "error: --nproc-per-node: already inside"),
])
def test_bad_launch_options_are_one_line_errors(tmp_path, monkeypatch, args, env, message):
    """Refused in one line, exit 2, before any folder is claimed or worker started."""
    if "cuda" in args and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs")
    from lmkit.cli import app

    monkeypatch.chdir(tmp_path)
    preset = _preset(tmp_path)
    if args[0] == "train":
        args = [*args, "--preset", str(preset), "--out-dir", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, args, env={"WORLD_SIZE": None, **env})
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------- SLURM examples

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "multi_gpu"
_FAKES = {  # stand-ins for SLURM and the launchers: record what the scripts would run
    "srun": 'while [ "${1#-}" != "$1" ]; do shift; done\nSLURM_NODEID=${SLURM_NODEID:-0} exec "$@"\n',
    "scontrol": '[ "$1 $2" = "show hostnames" ] && printf "node-a\\nnode-b\\n"\n',
    "lmkit": 'printf "%s\\0" "$@" > "$RECORD.lmkit"\n',
    "torchrun": 'printf "%s\\0" "$@" > "$RECORD.torchrun"\n',
}


def _script_run(script: str, tmp_path: Path, name: str) -> dict[str, list[str]]:
    """Run an example sbatch script with SLURM's variables and fake ``srun``/``scontrol``/
    ``lmkit``/``torchrun``; return the argument lists the fakes were called with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool, body in _FAKES.items():
        (bin_dir / tool).write_text("#!/bin/bash\n" + body)
        (bin_dir / tool).chmod(0o755)
    record = tmp_path / "record"
    for old in tmp_path.glob("record.*"):
        old.unlink()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), "SLURM_JOB_ID": "42",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]", "NAME": name, "OUT": str(tmp_path / "runs")}
    proc = subprocess.run(["bash", str(EXAMPLE / script)], cwd=tmp_path, env=env, text=True, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return {path.suffix[1:]: path.read_text().split("\0")[:-1] for path in tmp_path.glob("record.*")}


def _dry_run(args: list[str]) -> dict:
    from lmkit.cli import app

    result = CliRunner().invoke(app, [*args, "--dry-run", "--json"], env={"WORLD_SIZE": None})
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _parses(args: list[str]) -> None:
    import typer

    from lmkit.cli import app

    group = typer.main.get_command(app)
    ctx = group.make_context("lmkit", [], resilient_parsing=True)
    group.get_command(ctx, args[0]).make_context(args[0], list(args[1:]), parent=ctx)  # raises on a bad option


@pytest.mark.parametrize("script", ["slurm_1node_4gpu.sbatch", "slurm_2node_4gpu.sbatch"])
def test_slurm_examples_run_the_seed_004_pretraining(script, tmp_path):
    """The sbatch scripts are valid bash, ask SLURM for the SIGTERM before the time limit, and run
    (with SLURM's variables) a command lmkit accepts: seed 004's pretraining at its global batch of
    524,288 tokens per step on 4 or 8 GPUs; submitted again with the run folder there, a resume."""
    text = (EXAMPLE / script).read_text()
    assert subprocess.run(["bash", "-n", str(EXAMPLE / script)], capture_output=True).returncode == 0
    assert "#SBATCH --signal=TERM@120" in text
    calls = _script_run(script, tmp_path, "seed004")
    if script.startswith("slurm_1node"):
        args, processes = calls["lmkit"], 4
        assert args[args.index("--nproc-per-node") + 1] == "4" and "--max-restarts" in args
    else:
        launcher, processes = calls["torchrun"], 8
        head = launcher[:launcher.index("-m")]
        assert " ".join(head) == ("--nnodes 2 --nproc-per-node 4 --node-rank 0 --rdzv-backend c10d "
                                  "--rdzv-endpoint node-a:29500 --rdzv-id 42")
        assert launcher[launcher.index("-m") + 1] == "lmkit"
        args = launcher[launcher.index("-m") + 2:]
    assert args[0] == "train"
    report = _dry_run(args)
    cfg = report["config"]
    assert cfg["preset"] == "gpt2-124m-mul" and cfg["name"] == "seed004"
    tokens = processes * cfg["training"]["batch_size"] * cfg["training"]["grad_accum_steps"] * cfg["model"]["block_size"]
    assert tokens == 524_288

    (tmp_path / "runs" / "seed004").mkdir(parents=True)
    (tmp_path / "runs" / "seed004" / "config.yaml").write_text("")
    calls = _script_run(script, tmp_path, "seed004")
    args = calls["lmkit"] if "lmkit" in calls else calls["torchrun"][calls["torchrun"].index("-m") + 2:]
    assert args[:2] == ["resume", str(tmp_path / "runs" / "seed004")]
    _parses(args)
