"""What resume and start-up refuse: NaN updates, code in pickles, config drift, bad shards."""

import contextlib
import json
import os
import pickle

import pytest
import torch

from lmkit.config import build_run_config
from lmkit.errors import CheckpointError, TrainingError
from lmkit.training.checkpoint import save_checkpoint
from lmkit.training.loop import Trainer

from conftest import poison_training_loss, run_cli

PRESET = """\
model: {n_layer: 2, n_head: 2, n_embd: 32, d_ff: 64, block_size: 32, pos_encoding: rope, dropout: 0.1}
data:
  dataset: arithmetic
  tokenizer: char
  arithmetic: {n_train: 128, n_val: 16, n_test_flat: 4, n_test_paren: 4}
training: {batch_size: 16, max_steps: 10, lr: 3.0e-3, warmup_steps: 2, log_interval: 1, eval_interval: 5, seed: 3}
"""


@pytest.fixture
def preset(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PRESET)
    return path


def _trainer(tmp_path, preset, name, *overrides):
    # A constant LR, so runs of different lengths take the same steps.
    overrides = ("training.schedule=constant", *overrides)
    config = build_run_config(str(preset), list(overrides),
                              {"out_dir": ("--out-dir", str(tmp_path / "runs")), "name": ("--name", name)})
    return Trainer(config)


def test_nan_aborts_before_the_update_and_saves_nothing(tmp_path, preset, monkeypatch):
    reference = _trainer(tmp_path, preset, "ref", "training.max_steps=7")
    reference.run()
    poison_training_loss(monkeypatch, 8)
    trainer = _trainer(tmp_path, preset, "nan")
    with pytest.raises(TrainingError) as info:
        trainer.run()
    assert "at step 8; the update was not applied" in str(info.value) and "latest.pt" in str(info.value)
    assert trainer.step == 7
    for key, value in reference.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key  # weights after step 7
    assert torch.load(trainer.run.checkpoint_path("latest"), weights_only=True)["step"] == 5  # nothing new
    assert json.loads(trainer.run.summary_path.read_text())["status"] == "failed"


def test_on_nan_skip_leaves_weights_and_optimizer_unchanged(tmp_path, preset, monkeypatch):
    reference = _trainer(tmp_path, preset, "ref", "training.max_steps=9")
    reference.run()
    poison_training_loss(monkeypatch, 10)
    trainer = _trainer(tmp_path, preset, "skip", "training.on_nan=skip")
    summary = trainer.run()
    assert summary["status"] == "completed" and summary["nan_skips"] == 1
    for key, value in reference.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    ref_opt, opt = reference.optimizer.state_dict()["state"], trainer.optimizer.state_dict()["state"]
    for pid in ref_opt:
        for name in ref_opt[pid]:
            assert torch.equal(opt[pid][name], ref_opt[pid][name]), (pid, name)
    assert torch.load(trainer.run.checkpoint_path("latest"), weights_only=True)["nan_skips"] == 1


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['LMKIT_PWNED']}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, preset, monkeypatch):
    trained = run_cli("train", "--preset", str(preset), "--name", "r", "--max-steps", "2", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    marker = tmp_path / "pwned"
    monkeypatch.setenv("LMKIT_PWNED", str(marker))
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "step": 1, "payload": RunsCode()}, evil)
    result = run_cli("resume", "runs/r", "--checkpoint", str(evil), cwd=tmp_path,
                     env={"LMKIT_PWNED": str(marker)})
    assert result.returncode == 2
    assert "evil.pt: cannot be loaded (it contains Python objects that would run code" in result.stderr
    assert not marker.exists()

    # The same for a sharded (DCP) folder: DCP's own reader unpickles .metadata with plain pickle.
    # The folder is lmkit's, with its manifest re-forged to match (sizes, CRCs, its checksum), as
    # anyone who can write a pickle can: the restricted unpickler is what must refuse it.
    evil_dcp = _dcp_folder_with_code_in_metadata(tmp_path, tmp_path / "runs/r", tmp_path / "evil.dcp")
    result = run_cli("resume", "runs/r", "--checkpoint", str(evil_dcp), cwd=tmp_path,
                     env={"LMKIT_PWNED": str(marker)})
    assert result.returncode == 2, result.stderr
    assert "evil.dcp/.metadata: cannot be loaded (it contains Python objects that would run code" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    from lmkit.runs import load_run
    from lmkit.training.checkpoint import load_checkpoint
    from lmkit.training.sharded import load_sharded

    model = load_run(tmp_path / "runs/r", "latest").model
    for load in (load_checkpoint, lambda path: load_sharded(path, model)):  # eval/export/svd-analyze; resume
        with pytest.raises(CheckpointError, match=r"evil\.dcp/\.metadata: cannot be loaded \(it contains Python"):
            load(evil_dcp)
    assert not marker.exists()
    from torch.distributed.checkpoint import FileSystemReader

    with contextlib.suppress(Exception):  # control: DCP's stock reader runs the payload (then fails)
        FileSystemReader(evil_dcp).read_metadata()
    assert marker.exists()


def _dcp_folder_with_code_in_metadata(tmp_path, run_dir, folder):
    """Run ``run_dir``'s latest weights saved as an lmkit sharded folder, then its ``.metadata``
    replaced by a pickle that would run code and the manifest re-forged to match."""
    from lmkit.runs import load_run
    from lmkit.training.distributed import Distributed
    from lmkit.training.sharded import save_sharded
    from lmkit.training.sharded_files import MANIFEST, _manifest_checksum, file_crc32

    loaded = load_run(run_dir, "latest")
    save_sharded(loaded.model, None, {"step": loaded.step, "config": loaded.state["config"]}, folder, Distributed())
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    manifest = json.loads((folder / MANIFEST).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"bytes": (folder / name).stat().st_size, "crc32": file_crc32(folder / name)}
    manifest["checksum"] = _manifest_checksum(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_config_drift_unsafe_keys_are_refused_safe_ones_recorded(tmp_path, preset):
    assert run_cli("train", "--preset", str(preset), "--name", "d", "--max-steps", "4", cwd=tmp_path).returncode == 0
    unsafe = run_cli("resume", "runs/d", "--set", "model.n_layer=3", "--set", "training.lr=0.01", cwd=tmp_path)
    assert unsafe.returncode == 2
    assert "model.n_layer (2 -> 3)" in unsafe.stderr and "training.lr (0.003 -> 0.01)" in unsafe.stderr
    assert "start a new run instead" in unsafe.stderr
    safe = run_cli("resume", "runs/d", "--max-steps", "6", "--set", "training.eval_interval=3", cwd=tmp_path)
    assert safe.returncode == 0, safe.stderr
    events = [json.loads(line) for line in (tmp_path / "runs/d/events.jsonl").read_text().splitlines()]
    changes = [e for e in events if e["kind"] == "resumed"][0]["config_changes"]
    assert changes == {"training.eval_interval": [5, 3], "training.max_steps": [4, 6]}
    assert "max_steps: 6" in (tmp_path / "runs/d/config.yaml").read_text()


def test_versions_warn_and_another_world_size_keeps_the_global_batch(tmp_path, preset):
    assert run_cli("train", "--preset", str(preset), "--name", "v", "--max-steps", "3", cwd=tmp_path).returncode == 0
    latest = tmp_path / "runs/v/checkpoints/latest.pt"
    state = torch.load(latest, weights_only=True)
    save_checkpoint({**state, "torch_version": "1.13.0"}, latest)
    warned = run_cli("resume", "runs/v", "--max-steps", "4", cwd=tmp_path)
    assert warned.returncode == 0, warned.stderr
    assert "warning: checkpoint written by torch 1.13.0" in warned.stdout
    state = torch.load(latest, weights_only=True)
    save_checkpoint({**state, "world_size": 4}, latest)  # as if 4 DDP ranks had written it (issue 13)
    rescaled = run_cli("resume", "runs/v", "--max-steps", "5", cwd=tmp_path)
    assert rescaled.returncode == 0, rescaled.stderr
    assert ("from a checkpoint of 4 (ddp), loaded: training.grad_accum_steps 1 -> 4 per rank keeps the global "
            "batch of 4 micro-batches; the continuation is not bitwise") in " ".join(rescaled.stdout.split())


def test_unknown_run_lists_the_runs_that_exist(tmp_path, preset):
    assert run_cli("train", "--preset", str(preset), "--name", "exists", "--max-steps", "1",
                   cwd=tmp_path).returncode == 0
    result = run_cli("resume", "nope", cwd=tmp_path)
    assert result.returncode == 2 and "nope: no run there" in result.stderr and "exists" in result.stderr


# ------------------------------------------------------------------ bad data at start-up


@pytest.fixture
def text_run(tmp_path, monkeypatch):
    monkeypatch.setenv("LMKIT_CACHE_DIR", str(tmp_path / "cache"))  # this test damages its own cache
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"the line number {i} of a small corpus\n" for i in range(400)))
    preset = tmp_path / "t.yaml"
    preset.write_text(
        "model: {n_layer: 1, n_head: 1, n_embd: 16, block_size: 16}\n"
        f"data: {{dataset: '{corpus}', tokenizer: byte}}\n"
        "training: {batch_size: 4, max_steps: 2, eval_iters: 1}\n"
    )
    first = run_cli("train", "--preset", str(preset), "--name", "ok", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    cache = next((tmp_path / "cache" / "tokens").glob("corpus.txt-*"))
    return tmp_path, preset, cache


@pytest.mark.parametrize("damage", ["truncate", "empty", "dtype", "big_id"])
def test_damaged_shards_fail_before_step_one(text_run, damage):
    tmp_path, preset, cache = text_run
    shard, meta_path = cache / "train.bin", cache / "meta.json"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[:-7])
    elif damage == "empty":
        shard.write_bytes(b"")
    elif damage == "dtype":
        meta = json.loads(meta_path.read_text())
        meta["dtype"] = "uint32"
        meta_path.write_text(json.dumps(meta))
    else:
        data[10:12] = (300).to_bytes(2, "little")  # an id past the byte vocabulary (257)
        shard.write_bytes(bytes(data))
    result = run_cli("train", "--preset", str(preset), "--name", f"bad-{damage}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line
    expected = "holds token id 300" if damage == "big_id" else "truncated or corrupt"
    assert expected in line and (damage == "big_id" or ".bin: " in line)
    assert "step 1/" not in result.stdout
    assert not (tmp_path / "runs" / f"bad-{damage}").exists()  # the claimed folder was released


def test_model_vocabulary_smaller_than_tokenizer(text_run):
    tmp_path, preset, _ = text_run
    result = run_cli("train", "--preset", str(preset), "--name", "vocab", "--set", "model.vocab_size=100", cwd=tmp_path)
    assert result.returncode == 2 and "model.vocab_size: 100 is smaller than the byte tokenizer" in result.stderr


def test_split_shorter_than_a_window_exits_2_before_step_one(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("".join(f"line {i}\n" for i in range(20)))  # val: "line 18\nline 19\n", 16 bytes
    result = run_cli("train", "--data", str(corpus), "--tokenizer", "byte", "--name", "short", "--max-steps", "2",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "the val split has 16 tokens, fewer than block_size + 1 = 33" in result.stderr
    assert "step 1/" not in result.stdout and not (tmp_path / "runs/short").exists()
