"""Crash matrix: SIGKILL at many moments inside checkpoint saving, then `lmkit resume`."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lmkit.errors import CheckpointError
from lmkit.training.checkpoint import load_checkpoint

from conftest import run_cli

PRESET = """\
model: {n_layer: 2, n_head: 2, n_embd: 32, d_ff: 64, block_size: 32, pos_encoding: rope, dropout: 0.1}
data:
  dataset: arithmetic
  tokenizer: char
  arithmetic: {n_train: 128, n_val: 16, n_test_flat: 4, n_test_paren: 4}
training: {batch_size: 16, max_steps: 12, lr: 3.0e-3, warmup_steps: 2, log_interval: 1, eval_interval: 6,
           checkpoint_interval: 3, keep_last: 2, seed: 3}
"""
# Saves happen at steps 3, 6 (with best), 9 and 12 (with best): save_checkpoint calls 1..4.
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    (root / "p.yaml").write_text(PRESET)
    result = run_cli("train", "--preset", "p.yaml", "--name", "ref", cwd=root, env=ENV)
    assert result.returncode == 0, result.stderr
    return root, torch.load(root / "runs/ref/checkpoints/latest.pt", weights_only=True)


def kill_plans(size: int) -> list[str]:
    plans = [f"save={n},at={phase}" for n in (2, 3, 4)
             for phase in ("before_write", "after_write", "after_fsync", "after_replace", "after_link")]
    plans += [f"save={n},bytes={b}" for n in (2, 4) for b in (1, 100, size // 50, size // 3, (2 * size) // 3)]
    return plans


def killed_run(cwd, name: str, plan: str):
    """`lmkit train` that SIGKILLs itself inside a checkpoint save, as `plan` says."""
    return run_cli("train", "--preset", "p.yaml", "--name", name, cwd=cwd, env={**ENV, "LMKIT_TEST_CRASH": plan})


def crash_and_resume(root, plan: str, index: int):
    name = f"c{index}"
    killed = killed_run(root, name, plan)
    resumed = run_cli("resume", f"runs/{name}", cwd=root, env=ENV)
    return plan, name, killed, resumed


def _check_matrix(root, ref_state, plans) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda a: crash_and_resume(root, *a), [(p, i) for i, p in enumerate(plans)]))
    for plan, name, killed, resumed in results:
        assert killed.returncode == -9, (plan, killed.stderr[-500:])
        assert resumed.returncode == 0, (plan, resumed.stderr[-800:])
        ckpts = root / "runs" / name / "checkpoints"
        assert not [p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")], plan
        for path in ckpts.glob("*.pt"):
            load_checkpoint(path)  # every checkpoint left behind is complete
        final = torch.load(ckpts / "latest.pt", weights_only=True)
        assert final["step"] == 12, plan
        # the tags agree with the run's own records
        summary = json.loads((root / "runs" / name / "summary.json").read_text())
        assert torch.load(ckpts / "best.pt", weights_only=True)["step"] == summary["best_step"], plan
        for path in ckpts.glob("step_*.pt"):
            assert torch.load(path, weights_only=True)["step"] == int(path.stem.split("_")[1]), (plan, path)
        for key, value in ref_state["model"].items():
            assert torch.equal(final["model"][key], value), (plan, key)


def test_sigkill_inside_checkpoint_saving_never_loses_a_complete_checkpoint(reference):
    """Every phase of a save once (on saves 2, 3 and 4 in turn: with and without ``best``, before
    and after ``keep_last`` rotates) and three torn writes; the whole matrix is the slow test below."""
    root, ref_state = reference
    size = (root / "runs/ref/checkpoints/latest.pt").stat().st_size
    phases = ("before_write", "after_write", "after_fsync", "after_replace", "after_link")
    plans = [f"save={(2, 3, 4)[i % 3]},at={phase}" for i, phase in enumerate(phases)]
    plans += [f"save=2,bytes={size // 50}", f"save=4,bytes={size // 3}", f"save=2,bytes={(2 * size) // 3}"]
    assert set(plans) <= set(kill_plans(size))
    _check_matrix(root, ref_state, plans)


@pytest.mark.slow
def test_sigkill_matrix_every_save_phase_and_torn_write(reference):
    root, ref_state = reference
    size = (root / "runs/ref/checkpoints/latest.pt").stat().st_size
    plans = kill_plans(size)
    assert len(plans) >= 20
    _check_matrix(root, ref_state, plans)


def test_crash_during_the_first_save_leaves_nothing_to_resume(tmp_path):
    (tmp_path / "p.yaml").write_text(PRESET)
    killed = killed_run(tmp_path, "first", "save=1,at=after_fsync")
    assert killed.returncode == -9
    resumed = run_cli("resume", "runs/first", cwd=tmp_path, env=ENV)
    assert resumed.returncode == 2
    assert "no checkpoints to resume from" in resumed.stderr
    assert not list((tmp_path / "runs/first/checkpoints").iterdir())  # its temp file was removed


def test_truncated_latest_is_skipped_with_a_warning_naming_both(reference, tmp_path):
    root, ref_state = reference
    (tmp_path / "p.yaml").write_text(PRESET)
    first = run_cli("train", "--preset", "p.yaml", "--name", "t", "--max-steps", "9", cwd=tmp_path, env=ENV)
    assert first.returncode == 0, first.stderr
    latest = tmp_path / "runs/t/checkpoints/latest.pt"
    data = latest.read_bytes()
    # A torn copy (an interrupted rsync, a full disk): a new, half-written file. Files of the
    # same step are hard links, so unlink first; damage in place would hit all of them.
    latest.unlink()
    latest.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(latest)

    explicit = run_cli("resume", "runs/t", "--checkpoint", "latest", "--max-steps", "12", cwd=tmp_path, env=ENV)
    assert explicit.returncode == 2 and "latest.pt: cannot be loaded (truncated" in explicit.stderr

    resumed = run_cli("resume", "runs/t", "--max-steps", "12", cwd=tmp_path, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    warning = [line for line in resumed.stdout.splitlines() if line.startswith("warning: skipped")][0]
    assert "latest.pt: cannot be loaded (truncated" in warning and "resuming from" in warning
    assert warning.endswith("step_0000009.pt") or warning.endswith("best.pt")  # both hold step 9
    assert torch.load(latest, weights_only=True)["step"] == 12


def test_bit_flip_is_caught_by_the_manifest(reference, tmp_path):
    root, _ = reference
    source = root / "runs/ref/checkpoints/latest.pt"
    state = torch.load(source, weights_only=True)
    state["model"]["transformer.wte.weight"][0, 0] += 1.0  # the manifest still has the old checksum
    corrupt = tmp_path / "corrupt.pt"
    torch.save(state, corrupt)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(corrupt)


def test_logs_hold_each_step_once_after_a_crash(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "p.yaml").write_text(PRESET)
    # Killed before the third save (step 9): the session logged steps 7-9 past its last checkpoint.
    killed = killed_run(tmp_path, "logs", "save=3,at=before_write")
    assert killed.returncode == -9
    resumed = run_cli("train", "--resume", "--name", "logs", cwd=tmp_path, env=ENV)  # = lmkit resume runs/logs
    assert resumed.returncode == 0, resumed.stderr
    run = tmp_path / "runs/logs"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in rows if r["split"] == "val"] == [0, 6, 12]
    tb = EventAccumulator(str(run / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("train/loss")] == list(range(1, 13))
