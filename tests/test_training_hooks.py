"""The trainer's seams and numbers: hooks with checkpointed state, a rebuilt optimizer,
token-weighted gradient accumulation, the device-side NaN skip, the throughput
definitions, MFU peaks per precision and the CUDA RNG notice."""

import json
import time

import pytest
import torch

from lmkit.config import build_run_config
from lmkit.errors import TrainingError
from lmkit.events import NaNSkipped
from lmkit.training.hooks import TrainingHook
from lmkit.training.loop import Trainer
from lmkit.training.nan_guard import NaNGuard

from conftest import poison_training_loss

PRESET = """\
model: {n_layer: 2, n_head: 2, n_embd: 32, d_ff: 64, block_size: 32, pos_encoding: rope, dropout: 0.0}
data:
  dataset: arithmetic
  tokenizer: char
  arithmetic: {n_train: 128, n_val: 16, n_test_flat: 4, n_test_paren: 4}
training: {batch_size: 16, max_steps: 6, lr: 3.0e-3, warmup_steps: 2, log_interval: 1, eval_interval: 100,
           eval_at_start: false, seed: 3, tensorboard: false}
"""


@pytest.fixture
def preset(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PRESET)
    return path


def _config(tmp_path, preset, name, *overrides):
    return build_run_config(str(preset), list(overrides),
                            {"out_dir": ("--out-dir", str(tmp_path / "runs")), "name": ("--name", name)})


def _resumer(run_path, *overrides, emit=None):
    from lmkit.training.resume import resume_config

    config, changes = resume_config(run_path / "config.yaml", list(overrides))
    return Trainer(config, emit or (lambda e: None), resume_dir=run_path, config_changes=changes)


class GradCapture(TrainingHook):
    name = "grad_capture"

    def __init__(self):
        self.grads = []

    def after_backward(self, trainer, step):
        self.grads.append({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})


def _first_step_grads(tmp_path, preset, name, *overrides):
    trainer = Trainer(_config(tmp_path, preset, name, "training.max_steps=1", *overrides))
    capture = trainer.add_hook(GradCapture())
    trainer.run()
    return capture.grads[0], trainer


def test_accumulating_2_x_b_gives_the_gradients_of_one_batch_of_2b(tmp_path, preset):
    # Arithmetic examples have different lengths: the two micro-batches of 16 hold different
    # numbers of targets, so weighting each micro-batch's mean equally would be wrong.
    accum, trainer = _first_step_grads(tmp_path, preset, "accum", "training.batch_size=16",
                                       "training.grad_accum_steps=2")
    x0, y0 = trainer.batches.batch(0)
    x1, y1 = trainer.batches.batch(1)
    assert (y0 != -100).sum() != (y1 != -100).sum()  # the case the fix is about
    full, _ = _first_step_grads(tmp_path, preset, "full", "training.batch_size=32")
    for name, grad in full.items():
        assert (accum[name] - grad).abs().max().item() < 1e-6, name


def test_hook_state_is_checkpointed_and_restored_on_resume(tmp_path, preset):
    class Counter(TrainingHook):
        name = "counter"

        def __init__(self):
            self.steps_seen = 0
            self.restored = None

        def after_step(self, trainer, step):
            self.steps_seen += 1

        def state_dict(self):
            return {"steps_seen": self.steps_seen}

        def load_state_dict(self, state):
            self.restored = state["steps_seen"]
            self.steps_seen = state["steps_seen"]

    first = Trainer(_config(tmp_path, preset, "h", "training.max_steps=3"))
    first.add_hook(Counter())
    first.run()
    saved = torch.load(first.run.checkpoint_path("latest"), weights_only=True)
    assert saved["hooks"]["counter"] == {"steps_seen": 3}
    assert set(saved["hooks"]) >= {"throughput", "nan_guard", "counter"}

    second = _resumer(first.run.path, "training.max_steps=5")
    counter = second.add_hook(Counter())
    second.run()
    assert counter.restored == 3 and counter.steps_seen == 5


def test_a_rebuilt_optimizer_keeps_the_schedule_position_and_the_moments(tmp_path, preset):
    class FreezeEmbedding(TrainingHook):
        name = "freeze"

        def after_step(self, trainer, step):
            if step.step == 3:
                trainer.model.input_embedding().weight.requires_grad_(False)
                self.frozen = trainer.model.input_embedding().weight.detach().clone()
                self.lr_before = [g["lr"] for g in trainer.optimizer.param_groups]
                trainer.rebuild_optimizer()
                self.lr_after = [g["lr"] for g in trainer.optimizer.param_groups]

    straight = Trainer(_config(tmp_path, preset, "s"))
    straight.run()
    trainer = Trainer(_config(tmp_path, preset, "f"))
    hook = trainer.add_hook(FreezeEmbedding())
    trainer.run()
    assert hook.lr_after == pytest.approx(hook.lr_before)  # the schedule did not restart
    assert trainer.scheduler.last_epoch == 6
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx(
        [g["lr"] for g in straight.optimizer.param_groups])
    assert torch.equal(trainer.model.input_embedding().weight, hook.frozen)  # frozen from step 3 on
    wte = trainer.model.input_embedding().weight
    assert all(p is not wte for g in trainer.optimizer.param_groups for p in g["params"])
    # every parameter that kept training kept its AdamW moments: 6 steps counted, not 3
    steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps == {6.0}


def test_fused_adamw_skips_a_non_finite_step_on_the_device(tmp_path, preset, monkeypatch):
    monkeypatch.setattr(NaNGuard, "device_path_on_cpu", True)  # the CUDA path, run on the CPU
    fused = ("training.fused_optimizer=true", "training.schedule=constant", "training.log_interval=3")
    reference = Trainer(_config(tmp_path, preset, "ref", "training.max_steps=4", *fused))
    reference.run()
    poison_training_loss(monkeypatch, 5)
    events = []
    trainer = Trainer(_config(tmp_path, preset, "skip", "training.max_steps=5", "training.on_nan=skip", *fused),
                      emit=events.append)
    summary = trainer.run()
    assert trainer.nan_guard.on_device  # the path under test: no per-step host check
    assert summary["nan_skips"] == 1
    for key, value in reference.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    for pid, ref in reference.optimizer.state_dict()["state"].items():
        for name, tensor in ref.items():
            assert torch.equal(trainer.optimizer.state_dict()["state"][pid][name], tensor), (pid, name)
    skipped = [e for e in events if isinstance(e, NaNSkipped)]
    assert [(e.step, e.total) for e in skipped] == [(5, 1)]


def test_fused_abort_raises_at_the_next_log_line_naming_the_bad_step(tmp_path, preset, monkeypatch):
    monkeypatch.setattr(NaNGuard, "device_path_on_cpu", True)  # the CUDA path, run on the CPU
    poison_training_loss(monkeypatch, 2)
    trainer = Trainer(_config(tmp_path, preset, "abort", "training.fused_optimizer=true", "training.log_interval=3"))
    with pytest.raises(TrainingError, match=r"at step 2 \(found at step 3's log line"):
        trainer.run()
    assert trainer.step == 3


def test_train_and_wall_throughput_are_defined_apart(tmp_path, preset):
    class SlowHook(TrainingHook):  # stands for evaluation / saving work between steps
        name = "slow"

        def after_step(self, trainer, step):
            time.sleep(0.2)

    trainer = Trainer(_config(tmp_path, preset, "tp"))
    trainer.add_hook(SlowHook())
    summary = trainer.run()
    assert summary["wall_time_s"] - summary["train_time_s"] >= 6 * 0.2
    # the times are rounded to 1 ms in summary.json
    assert summary["tokens"] / summary["train_tok_per_s"] == pytest.approx(summary["train_time_s"], abs=2e-3)
    assert summary["tokens"] / summary["wall_tok_per_s"] == pytest.approx(summary["wall_time_s"], abs=2e-3)
    assert summary["flops_per_token"] == trainer.model.flops_per_token()
    written = json.loads(trainer.run.summary_path.read_text())
    assert written["train_tok_per_s"] > 1.5 * written["wall_tok_per_s"]
    rows = [json.loads(line) for line in trainer.run.metrics_path.read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    # the log lines' rates are over training time only (one step per line here): the sleeps are not in it
    assert sum(r["step_time_s"] for r in train_rows) == pytest.approx(summary["train_time_s"], rel=0.02)


def test_mfu_peak_follows_the_precision(monkeypatch):
    from lmkit import device as dev

    monkeypatch.delenv("LMKIT_PEAK_FLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    cuda = torch.device("cuda", 0)
    # NVIDIA H100/H200 SXM data sheet, dense: 989.5 TF bf16, 494.7 TF tf32, 66.9 TF fp32
    assert dev.peak_flops(cuda, "bf16") == (989.5e12, "NVIDIA H200, bf16 dense")
    assert dev.peak_flops(cuda, "fp32", tf32=True)[0] == 494.7e12
    assert dev.peak_flops(cuda, "fp32", tf32=False)[0] == 66.9e12
    assert dev.peak_flops(torch.device("cpu"), "fp32") == (None, None)


def test_a_cuda_rng_state_that_cannot_be_restored_is_a_notice(tmp_path, preset, monkeypatch):
    import lmkit.training.state as state_module
    from lmkit.training import rng

    def with_cuda():
        state = rng.rng_state()
        state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 2  # written on a 2-GPU machine
        return state

    monkeypatch.setattr(state_module, "rng_state", with_cuda)
    first = Trainer(_config(tmp_path, preset, "rng", "training.max_steps=2"))
    first.run()
    events = []
    _resumer(first.run.path, "training.max_steps=3", emit=events.append).run()
    notes = [e.message for e in events if getattr(e, "kind", "") == "notice"]
    assert any("CUDA RNG state of 2 device(s)" in n and "not bitwise" in n for n in notes), notes
    logged = first.run.events_path.read_text()
    assert "CUDA RNG state of 2 device(s)" in logged


def test_on_the_cpu_a_fused_optimizer_is_checked_on_the_host_at_the_bad_step(tmp_path, preset, monkeypatch):
    poison_training_loss(monkeypatch, 2)
    trainer = Trainer(_config(tmp_path, preset, "abort-cpu", "training.fused_optimizer=true",
                              "training.log_interval=3"))
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) .* at step 2; the update was not applied"):
        trainer.run()
    assert trainer.optimizer.defaults["fused"] and not trainer.nan_guard.on_device
    assert trainer.step == 1  # stopped at the bad step, not at the next log line
