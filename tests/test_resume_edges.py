"""Resume edge cases: older checkpoints, hand-edited configs, concurrent use, log windows."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from lmkit.errors import CheckpointError
from lmkit.training.checkpoint import load_checkpoint

from conftest import run_cli

ENV = {"OMP_NUM_THREADS": "1"}
PRESET = """\
model: {n_layer: 1, n_head: 2, n_embd: 32, d_ff: 64, block_size: 32, pos_encoding: rope, dropout: 0.1}
data:
  dataset: arithmetic
  tokenizer: char
  arithmetic: {n_train: 128, n_val: 16, n_test_flat: 4, n_test_paren: 4}
training: {batch_size: 16, grad_accum_steps: 2, max_steps: 20, lr: 3.0e-3, warmup_steps: 2, log_interval: 4,
           eval_interval: 5, checkpoint_interval: 5, keep_last: 3, seed: 7}
"""


@pytest.fixture
def cwd(tmp_path):
    (tmp_path / "p.yaml").write_text(PRESET)
    return tmp_path


def train(cwd, name, *args, env=None):
    result = run_cli("train", "--preset", "p.yaml", "--name", name, *args, cwd=cwd, env={**ENV, **(env or {})})
    return result


def records(run, split="train"):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == split]


def same_weights(a, b):
    sa = torch.load(a, weights_only=True)["model"]
    sb = torch.load(b, weights_only=True)["model"]
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_log_windows_survive_a_resume(cwd):
    assert train(cwd, "straight").returncode == 0
    assert train(cwd, "cut", env={"LMKIT_TEST_SIGNAL": "11:SIGTERM"}).returncode == 143  # stops at step 6
    assert run_cli("resume", "runs/cut", cwd=cwd, env=ENV).returncode == 0
    # log_interval 4: the window 5-8 spans the stop; its mean must match the straight run's
    assert records(cwd / "runs/cut") == records(cwd / "runs/straight")
    assert [s for s, _ in records(cwd / "runs/cut")] == [1, 4, 8, 12, 16, 20]
    summary = json.loads((cwd / "runs/cut/summary.json").read_text())
    straight = json.loads((cwd / "runs/straight/summary.json").read_text())
    for key in ("steps", "tokens", "final_val_loss", "final_val_step", "best_val_loss", "best_step", "final_metrics"):
        assert summary[key] == straight[key], key


def test_resume_from_an_older_checkpoint_moves_the_later_ones_aside(cwd):
    assert train(cwd, "straight").returncode == 0
    assert train(cwd, "old").returncode == 0
    ckpts = cwd / "runs/old/checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000010.pt", "step_0000015.pt", "step_0000020.pt"]
    logged = (cwd / "runs/old/metrics.jsonl").read_bytes().splitlines(keepends=True)
    # Going back to step 10, killed before its first save: the next plain resume must start
    # from step 10 again, not from the abandoned step 20.
    crashed = run_cli("resume", "runs/old", "--checkpoint", "step_0000010", cwd=cwd,
                      env={**ENV, "LMKIT_TEST_CRASH": "save=1,at=before_write"})
    assert crashed.returncode == -9
    # the abandoned steps 11-20 are moved aside, byte for byte, never deleted
    later = [line for line in logged if json.loads(line)["step"] > 10]
    assert len(later) >= 4 and (cwd / "runs/old/superseded/metrics.jsonl").read_bytes() == b"".join(later)
    assert torch.load(ckpts / "latest.pt", weights_only=True)["step"] == 10
    aside = sorted(p.name for p in (ckpts / "superseded").iterdir())
    assert "step_0000015.pt" in aside and "step_0000020.pt" in aside
    again = run_cli("resume", "runs/old", cwd=cwd, env=ENV)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000010.pt", "step_0000015.pt", "step_0000020.pt"]
    assert same_weights(ckpts / "latest.pt", cwd / "runs/straight/checkpoints/latest.pt")
    assert [s for s, _ in records(cwd / "runs/old")] == [1, 4, 8, 12, 16, 20]
    best = torch.load(ckpts / "best.pt", weights_only=True)
    assert best["step"] == json.loads((cwd / "runs/old/summary.json").read_text())["best_step"]


def test_hand_edited_config_or_foreign_checkpoint_is_refused(cwd):
    assert train(cwd, "a", "--max-steps", "6").returncode == 0
    assert train(cwd, "b", "--max-steps", "6", "--seed", "99").returncode == 0
    config = cwd / "runs/a/config.yaml"
    original = config.read_text()
    config.write_text(original.replace("batch_size: 16", "batch_size: 8"))
    edited = run_cli("resume", "runs/a", "--max-steps", "10", cwd=cwd, env=ENV)
    assert edited.returncode == 2 and "was trained with training.batch_size = 16 (now 8)" in edited.stderr
    config.write_text(original.replace("n_layer: 1", "n_layer: 2"))
    assert run_cli("resume", "runs/a", "--max-steps", "10", cwd=cwd, env=ENV).returncode == 2
    config.write_text(original)
    foreign = run_cli("resume", "runs/a", "--max-steps", "10", "--checkpoint",
                      str(cwd / "runs/b/checkpoints/latest.pt"), cwd=cwd, env=ENV)
    assert foreign.returncode == 2 and "training.seed = 99 (now 7)" in foreign.stderr


def test_finished_runs_and_shorter_lengths_are_refused(cwd):
    assert train(cwd, "done", "--max-steps", "6").returncode == 0
    before = (cwd / "runs/done/summary.json").read_text()
    finished = run_cli("resume", "runs/done", cwd=cwd, env=ENV)
    assert finished.returncode == 2 and "has finished its 6 steps" in finished.stderr
    shorter = run_cli("resume", "runs/done", "--max-steps", "4", cwd=cwd, env=ENV)
    assert shorter.returncode == 2 and "the new length (4 steps) is shorter than what" in shorter.stderr
    assert "has trained (6 steps)" in shorter.stderr
    assert (cwd / "runs/done/summary.json").read_text() == before
    missing = run_cli("resume", "runs/done", "--checkpoint", "step_0000009", "--max-steps", "8", cwd=cwd, env=ENV)
    assert missing.returncode == 2  # a checkpoint that is not there: name the ones that are
    assert "step_0000009.pt: no such checkpoint in runs/done (have: best, latest, step_0000005)" in missing.stderr


def test_extending_a_run_uses_the_new_schedule_from_the_first_step(cwd):
    from lmkit.training.schedule import lr_multiplier

    assert train(cwd, "ext", "--max-steps", "8", "--set", "training.log_interval=1").returncode == 0
    assert run_cli("resume", "runs/ext", "--max-steps", "16", cwd=cwd, env=ENV).returncode == 0
    rows = [json.loads(line) for line in (cwd / "runs/ext/metrics.jsonl").read_text().splitlines()]
    lr9 = [r["lr"] for r in rows if r["split"] == "train" and r["step"] == 9][0]
    assert lr9 == pytest.approx(3e-3 * lr_multiplier(8, schedule="cosine", warmup_steps=2, total_steps=16,
                                                     min_lr_ratio=0.1), rel=1e-12)


def test_a_run_in_use_is_refused(cwd):
    proc = subprocess.Popen([sys.executable, "-m", "lmkit", "train", "--preset", "p.yaml", "--name", "busy",
                             "--max-steps", "100000"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **ENV})
    try:
        for line in proc.stdout:
            if line.startswith("step 4/"):
                break
        second = run_cli("resume", "runs/busy", cwd=cwd, env=ENV)
        assert second.returncode == 2 and "in use by another lmkit process" in second.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 143
    assert not [p for p in (cwd / "runs/busy/checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_signal_during_setup_releases_the_run_folder(cwd):
    stopped = train(cwd, "early", env={"LMKIT_TEST_SIGNAL_SETUP": "SIGTERM"})
    assert stopped.returncode == 143 and "before training started; nothing was saved" in stopped.stderr
    assert not (cwd / "runs/early").exists()
    assert train(cwd, "early", "--max-steps", "2").returncode == 0


def test_a_folder_whose_run_never_started_can_be_reused(cwd):
    folder = cwd / "runs/ghost"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("name: ghost\n")  # killed (SIGKILL) during set-up
    result = train(cwd, "ghost", "--max-steps", "2")
    assert result.returncode == 0, result.stderr


def test_scalar_fields_are_covered_by_the_manifest(cwd, tmp_path):
    assert train(cwd, "m", "--max-steps", "5").returncode == 0
    state = torch.load(cwd / "runs/m/checkpoints/latest.pt", weights_only=True)
    state["micro_step"] += 1  # the manifest is left as it was
    flipped = tmp_path / "flipped.pt"
    torch.save(state, flipped)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(flipped)


def test_checkpoint_files_are_world_readable_like_other_run_files(cwd):
    assert train(cwd, "perm", "--max-steps", "5").returncode == 0
    mode = (cwd / "runs/perm/checkpoints/latest.pt").stat().st_mode & 0o777
    assert mode == (cwd / "runs/perm/summary.json").stat().st_mode & 0o777


def test_last_evaluation_survives_resumes_without_evals(cwd):
    assert train(cwd, "lv", env={"LMKIT_TEST_SIGNAL": "13:SIGTERM"}).returncode == 143  # stop at step 7
    time.sleep(0.01)
    resumed = run_cli("resume", "runs/lv", cwd=cwd, env={**ENV, "LMKIT_TEST_SIGNAL": "17:SIGTERM"})
    assert resumed.returncode == 143  # stop at step 9, before the next evaluation (step 10)
    summary = json.loads((cwd / "runs/lv/summary.json").read_text())
    assert summary["final_val_step"] == 5 and summary["final_val_loss"] is not None and summary["final_metrics"]
