"""FSDP2 training (``training.parallelism: fsdp``, gloo, 2 CPU processes): the same steps as one
process, sharded checkpoints that survive a SIGKILL mid-save and export/evaluate, and resumes on
another number of processes that keep the global batch.

Every run is a real ``python -m lmkit`` process under ``torch.distributed.run`` on the padded
arithmetic task (micro-batches with different target counts: a loss not weighted by the global
count, or gradients reduced on the wrong micro-batch, give other updates than one process). The
reference is always an ordinary single-process run with the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmkit.errors import CheckpointError, ConfigError
from lmkit.training.checkpoint import load_checkpoint
from lmkit.training.distributed import Distributed
from lmkit.training.resume import rescale_accumulation, resume_config

from conftest import TINY_PRESET

ENV = {"OMP_NUM_THREADS": "1", "LMKIT_THREADS": "1"}
FSDP = ("--set", "training.parallelism=fsdp")


def _preset(tmp_path: Path, ckpt_interval: str = "null", dropout: float = 0.0) -> Path:
    text = TINY_PRESET.format(pos="rope", steps=8, eval_interval="null", ckpt_interval=ckpt_interval)
    path = tmp_path / "tiny.yaml"
    path.write_text(text.replace("log_interval: 5", "log_interval: 1").replace("dropout: 0.0", f"dropout: {dropout}"))
    return path


def _start(args: list[str], cwd: Path, ranks: int = 1, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m lmkit ARGS``, under ``torch.distributed.run`` with ``ranks > 1``, started."""
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    return subprocess.Popen([sys.executable, *launch, "-m", "lmkit", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **ENV, **(env or {})})


def _wait(*procs: subprocess.Popen, timeout: int = 150) -> list[subprocess.CompletedProcess]:
    """Wait for processes started together (independent runs overlap: the startup dominates); a
    hang is a failure, never a stuck test run."""
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out


def _lmkit(args: list[str], cwd: Path, ranks: int = 1, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return _wait(_start(args, cwd, ranks, env))[0]


def _train(preset: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--preset", str(preset), "--out-dir", str(runs), "--name", name, "--device", "cpu", "--no-tui",
            *extra]


def _records(run: Path, kind: str = "metrics") -> list[dict]:
    return [json.loads(line) for line in (run / f"{kind}.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if r["split"] == "train"}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


def test_two_fsdp_ranks_equal_one_process_and_continue_on_one(tmp_path):
    """2 FSDP ranks x batch B x accumulation 2 == 1 process x batch B x accumulation 4: losses to
    1e-6, final weights (consolidated from the DCP folder) to 1e-5; only rank 0 wrote the run folder.
    Then the FSDP run resumed on 1 process (DCP reshards; accumulation 2 -> 4) says so in a notice and
    continues as the single-process run continues (to 1e-6)."""
    preset, runs = _preset(tmp_path), tmp_path / "runs"
    fsdp, one = _wait(_start(_train(preset, runs, "fsdp", *FSDP, "--set", "training.grad_accum_steps=2"), tmp_path,
                             ranks=2),
                      _start(_train(preset, runs, "one", "--set", "training.grad_accum_steps=4"), tmp_path))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]

    a, b = _losses(runs / "fsdp"), _losses(runs / "one")
    assert sorted(a) == list(range(1, 9))
    assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-6, rel=0)
    sharded = load_checkpoint(runs / "fsdp" / "checkpoints" / "latest.dcp")
    _assert_same(sharded["model"], load_checkpoint(runs / "one" / "checkpoints" / "latest.pt")["model"])
    assert sharded["world_size"] == 2 and sharded["parallelism"] == "fsdp" and len(sharded["rng_ranks"]) == 2

    # rank 0 alone writes: the same files as one process, one TensorBoard file, one start record
    assert sorted(p.name for p in (runs / "fsdp").iterdir()) == sorted(p.name for p in (runs / "one").iterdir())
    assert len(list((runs / "fsdp" / "tb").iterdir())) == 1
    started = [e for e in _records(runs / "fsdp", "events") if e["kind"] == "run_started"]
    assert len(started) == 1
    assert (started[0]["world_size"], started[0]["parallelism"], started[0]["local_device_uuids"]) == (2, "fsdp", [])
    assert sorted(p.name for p in (runs / "fsdp" / "checkpoints").iterdir()) == ["best.dcp", "latest.dcp"]
    shards = sorted(p.name for p in (runs / "fsdp" / "checkpoints" / "latest.dcp").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # every rank wrote its own shard
    assert "(FSDP, gloo); global batch 64 sequences" in fsdp.stdout

    # a run keeps its checkpoint form: switching DDP <-> FSDP on a resume is refused in one line
    for run, switch in (("one", "fsdp"), ("fsdp", "ddp")):
        with pytest.raises(ConfigError, match=r"resume: training.parallelism \S+ -> \S+ is not supported"):
            resume_config(runs / run / "config.yaml", [f"training.parallelism={switch}"])

    # continue both on one process to step 10: the FSDP run's continuation is the single one's
    more = ["--max-steps", "10", "--no-tui"]
    cont, ref = _wait(_start(["resume", str(runs / "fsdp"), *more], tmp_path),
                      _start(["resume", str(runs / "one"), *more], tmp_path))
    assert cont.returncode == 0, cont.stderr[-3000:]
    assert ("resumed on 1 process (one process) from a checkpoint of 2 (fsdp), resharded by DCP: "
            "training.grad_accum_steps 2 -> 4 per rank") in cont.stdout + cont.stderr
    assert "not bitwise" in cont.stdout + cont.stderr
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = _losses(runs / "fsdp"), _losses(runs / "one")
    assert sorted(a) == list(range(1, 11))
    assert [a[s] for s in (9, 10)] == pytest.approx([b[s] for s in (9, 10)], abs=1e-6, rel=0)
    _assert_same(load_checkpoint(runs / "fsdp" / "checkpoints" / "latest.dcp")["model"],
                 load_checkpoint(runs / "one" / "checkpoints" / "latest.pt")["model"])


def test_fsdp_killed_mid_save_resumes_from_last_complete_then_exports_and_evaluates(tmp_path):
    """The ranks are SIGKILLed in the middle of their second sharded save (step 4: shards written,
    no manifest yet, still under the temporary name); torchrun ends the job. ``lmkit resume``
    on 2 processes picks the step-2 folder, removes the torn one and finishes bitwise where an
    uninterrupted run ends (dropout 0.1: every rank's RNG comes back); the final checkpoint exports
    to Hugging Face (logits verified) and evaluates."""
    preset, runs = _preset(tmp_path, ckpt_interval="2", dropout=0.1), tmp_path / "runs"
    # checkpoint.py's crash hook: both ranks die at their second save, after writing their shards
    cut, full = _wait(_start(_train(preset, runs, "cut", *FSDP), tmp_path, ranks=2,
                             env={"LMKIT_TEST_CRASH": "save=2,at=after_shards"}),
                      _start(_train(preset, runs, "full", *FSDP), tmp_path, ranks=2))
    assert cut.returncode != 0
    assert full.returncode == 0, full.stderr[-3000:]
    ckpts = runs / "cut" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["latest.dcp", "step_0000002.dcp"]
    assert any(p.name.startswith(".step_0000004.dcp.") for p in ckpts.iterdir())  # the torn save, never under its tag

    resumed = _lmkit(["resume", str(runs / "cut"), "--no-tui"], tmp_path, ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    event = [e for e in _records(runs / "cut", "events") if e["kind"] == "resumed"][-1]
    assert event["step"] == 2 and event["checkpoint"].endswith("latest.dcp") and event["removed_temp_files"]
    assert "the continuation is bitwise" in resumed.stdout + resumed.stderr
    assert sorted(_losses(runs / "cut")) == list(range(1, 9))
    # the periodic folders pruned to keep_last 2, no temporary or stray entries
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.dcp", "latest.dcp", "step_0000006.dcp",
                                                       "step_0000008.dcp"]
    final = load_checkpoint(ckpts / "latest.dcp")
    assert final["step"] == 8
    uninterrupted = load_checkpoint(runs / "full" / "checkpoints" / "latest.dcp")["model"]
    assert all(torch.equal(final["model"][k], uninterrupted[k]) for k in uninterrupted)
    assert _losses(runs / "cut") == _losses(runs / "full")

    exported, evaluated = _wait(
        _start(["export", str(runs / "cut"), "--to", "hf", str(tmp_path / "hf"), "--checkpoint", "latest"], tmp_path),
        _start(["eval", str(runs / "cut"), "--task", "perplexity", "--checkpoint", "latest", "--json"], tmp_path))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "verified" in exported.stdout and (tmp_path / "hf" / "model.safetensors").is_file()
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)  # the results, machine-readable
    assert (runs / "cut" / "eval").is_dir()


def test_accumulation_rescaled_for_another_world_size_or_refused():
    """The global batch is kept: 2 ranks x 1 -> 1 x 2, 1 x 4 -> 2 x 2; a split that does not
    divide is refused in one line; the same world size is bitwise (one process: no note)."""
    two = {"world_size": 2, "parallelism": "ddp"}
    assert rescale_accumulation(two, Path("c.pt"), world_size=1, grad_accum_steps=1, parallelism=None)[0] == 2
    accum, note = rescale_accumulation({"world_size": 1}, Path("c.pt"), world_size=2, grad_accum_steps=4,
                                       parallelism="ddp")
    assert accum == 2 and "not bitwise" in note
    with pytest.raises(CheckpointError, match="cannot share equally"):
        rescale_accumulation(two, Path("c.pt"), world_size=4, grad_accum_steps=1, parallelism="ddp")
    assert rescale_accumulation(two, Path("c.pt"), world_size=2, grad_accum_steps=3, parallelism="ddp") == (
        3, "resumed on the 2 processes the checkpoint was written by (ddp): the continuation is bitwise the "
           "uninterrupted run")
    assert rescale_accumulation({"world_size": 1}, Path("c.pt"), world_size=1, grad_accum_steps=3,
                                parallelism=None) == (3, None)


@pytest.mark.parametrize(("kw", "message"), [
    ({"optimizer": "muon"}, "training.optimizer: muon is not yet supported with training.parallelism: fsdp"),
    ({"precision": "fp16"}, "training.precision: fp16 (GradScaler) is not yet supported with"),
])
def test_fsdp_refuses_what_it_does_not_support(kw, message):
    """Muon and fp16 + GradScaler under FSDP: one-line ConfigErrors (exit 2) before any work;
    DDP takes them."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Distributed(2, 0, 0).check("fsdp", "cpu", **kw)
    Distributed(2, 0, 0).check("ddp", "cpu", **kw)
    Distributed(2, 0, 0).check("fsdp", "cpu", optimizer="adamw", precision="bf16")


def test_one_launched_process_runs_fsdp_or_ddp_only_when_asked(tmp_path):
    """``--nproc-per-node 1`` with ``training.parallelism`` set: a process group of one (gloo here,
    NCCL on a GPU) and the FSDP / DDP code path -- a DCP folder with one shard, the parallelism
    recorded -- with the losses of an ordinary process (to 1e-6). Without the setting, the launched
    worker is an ordinary process (a ``.pt`` checkpoint, no parallelism)."""
    preset, runs = _preset(tmp_path), tmp_path / "runs"
    launched = ("--nproc-per-node", "1")
    fsdp, ddp, plain, one = _wait(
        _start(_train(preset, runs, "fsdp1", *FSDP, *launched), tmp_path),
        _start(_train(preset, runs, "ddp1", "--set", "training.parallelism=ddp", *launched), tmp_path),
        _start(_train(preset, runs, "plain1", *launched), tmp_path),
        _start(_train(preset, runs, "one"), tmp_path))
    for proc in (fsdp, ddp, plain, one):
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data parallel: 1 process (FSDP, gloo); global batch 16 sequences = 1 rank x 16" in fsdp.stdout
    assert "data parallel" not in plain.stdout + plain.stderr
    reference = _losses(runs / "one")
    for name in ("fsdp1", "ddp1", "plain1"):
        assert list(_losses(runs / name).values()) == pytest.approx(list(reference.values()), abs=1e-6, rel=0), name
    started = {name: [e for e in _records(runs / name, "events") if e["kind"] == "run_started"][0]
               for name in ("fsdp1", "ddp1", "plain1")}
    assert [(started[n]["world_size"], started[n]["parallelism"]) for n in ("fsdp1", "ddp1", "plain1")] == \
        [(1, "fsdp"), (1, "ddp"), (1, None)]
    shards = sorted(p.name for p in (runs / "fsdp1" / "checkpoints" / "latest.dcp").glob("*.distcp"))
    assert shards == ["__0_0.distcp"]
    state = load_checkpoint(runs / "fsdp1" / "checkpoints" / "latest.dcp")
    assert (state["world_size"], state["parallelism"]) == (1, "fsdp")
    _assert_same(state["model"], load_checkpoint(runs / "one" / "checkpoints" / "latest.pt")["model"])
    assert torch.load(runs / "ddp1" / "checkpoints" / "latest.pt", weights_only=True)["parallelism"] == "ddp"
    assert "parallelism" not in torch.load(runs / "plain1" / "checkpoints" / "latest.pt", weights_only=True)
