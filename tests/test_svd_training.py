"""Adaptive-SVD training end to end: the hook's switches, the optimizer following the mode,
svd.jsonl, resume across a switch, and eval/export of an SVD run."""

import json

import pytest
import torch

from conftest import run_cli
from lmkit.training.hooks import TrainingHook
from test_resume import ONE_THREAD, assert_same_state

# A tiny nanochat-shaped model would do as well; the plain GPT keeps this fast. Layer 0's fused
# c_attn is (96 x 32): g = 32 components.
SVD_PRESET = """\
model: {n_layer: 2, n_head: 2, n_embd: 32, d_ff: 64, block_size: 32, pos_encoding: rope, dropout: 0.0}
data:
  dataset: arithmetic
  tokenizer: char
  arithmetic: {n_train: 256, n_val: 32, n_test_flat: 8, n_test_paren: 8}
training:
  batch_size: 16
  grad_accum_steps: 2
  max_steps: 30
  lr: 1.0e-2
  warmup_steps: 2
  log_interval: 2
  eval_interval: 10
  eval_iters: 2
  checkpoint_interval: 10
  keep_last: 3
  seed: 3
svd:
  enabled: true
  targets: ["transformer.h.0.attn.*"]
  interval: 4
  warmup_steps: 0
  r_min: 2
"""

# Thresholds that force the cycle: never "danger"; always "stable" with minor alignment > 0, so
# the first decision goes low-rank while the reconstruction from the top k = g - r components
# is within recon_safe of W; once training the minor factors raises r (more components
# changing), k shrinks, the reconstruction error passes recon_safe and the layer goes back.
FORCE = ["svd.principal_danger=1.0", "svd.minor_safe=0.0", "svd.angle_stable=3.2", "svd.recon_safe=0.7"]


def svd_records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "svd.jsonl").read_text().splitlines()]


def train_in_process(tmp_path, overrides, hooks=()):
    from lmkit.config import build_run_config
    from lmkit.training.loop import Trainer

    preset = tmp_path / "svd.yaml"
    preset.write_text(SVD_PRESET)
    config = build_run_config(str(preset), [f"out_dir={tmp_path / 'runs'}", *overrides])
    events = []
    trainer = Trainer(config, events.append)
    for hook in hooks:
        trainer.add_hook(hook)
    trainer.run()
    return trainer, events


class ModeWatch(TrainingHook):
    """A test hook: after every step, each SVD layer's mode, which of its parameters train, and
    whether exactly those are in the optimizer."""

    name = "mode_watch"

    def __init__(self):
        self.rows = []

    def after_step(self, trainer, step):
        from lmkit.models.svd_linear import AdaptiveSVDLinear

        in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        for name, m in trainer.model.named_modules():
            if isinstance(m, AdaptiveSVDLinear):
                trains = {n: p.requires_grad for n, p in m.named_parameters()}
                listed = {n: id(p) in in_opt for n, p in m.named_parameters()}
                self.rows.append((trainer.step, name, m.mode, trains, listed))


def test_forced_thresholds_switch_full_lowrank_full_and_the_optimizer_follows(tmp_path):
    from lmkit.events import SVDAnalysis, SVDModeSwitch

    watch = ModeWatch()
    trainer, events = train_in_process(tmp_path, FORCE, hooks=[watch])
    run = trainer.run.path
    records = svd_records(run)
    analyses = [e for e in events if isinstance(e, SVDAnalysis)]
    assert len(records) == len(analyses) == 2 * (30 // 4)  # two layers (c_attn, c_proj), every 4 steps
    assert records[0]["reason"] == "initial_svd_computation" and records[0]["action"] == "snapshot"
    cycled = []
    for layer in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"):
        actions = [r["action"] for r in records if r["layer"] == layer]
        if "to_lowrank" in actions and "to_full" in actions[actions.index("to_lowrank"):]:
            cycled.append(layer)
    assert cycled, [(r["step"], r["layer"], r["action"], r["reason"]) for r in records]
    back = [r for r in records if r["action"] == "to_full"]
    assert all(r["reason"] == "reconstruction_unsafe" for r in back)
    assert any(r["action"] == "refactor" and r["r_after"] == r["r_next"] != r["r"] for r in records)
    switches = [e for e in events if isinstance(e, SVDModeSwitch)]
    assert switches and "SWITCHED TO LOW-RANK (r=" in switches[0].message
    # every metric exists in both modes (the seed's low-rank layers had no gradient)
    low = [r for r in records if r["mode"] == "lowrank"]
    assert low and all("principal_alignment" in r["metrics"] and "minor_alignment" in r["metrics"] for r in low)
    # the MiLoRA init reproduces W at the switch
    to_low = [r for r in records if r["action"] == "to_lowrank"]
    assert all(r["metrics"]["milora_max_abs_diff"] < 1e-5 for r in to_low)
    # trainability and the optimizer's parameters follow the mode, at every step
    for _, _, mode, trains, listed in watch.rows:
        if mode == "full":
            assert trains["weight"] and not trains.get("lora_A", False) and not trains.get("lora_B", False)
        else:
            assert not trains["weight"] and trains["lora_A"] and trains["lora_B"]
        assert listed == trains
    # the step of a switch is not applied: the weights of the other layers did not move then
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"


def test_a_step_with_a_switch_leaves_every_weight_unchanged(tmp_path):
    snapshots = {}

    class Weights(ModeWatch):
        name = "weights"

        def before_step(self, trainer):
            snapshots[trainer.step + 1] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()
                                           if k.endswith("mlp.c_fc.weight")}

        def after_step(self, trainer, step):
            snapshots[(trainer.step, "after")] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()
                                                  if k.endswith("mlp.c_fc.weight")}

    trainer, _ = train_in_process(tmp_path, FORCE, hooks=[Weights()])
    records = svd_records(trainer.run.path)
    switch_steps = {r["step"] for r in records if r["action"] in ("to_lowrank", "to_full")}
    assert switch_steps
    for s in switch_steps:
        for key, before in snapshots[s].items():
            assert torch.equal(before, snapshots[(s, "after")][key]), (s, key)
    other = next(s for s in range(2, 30) if s not in switch_steps)
    assert any(not torch.equal(b, snapshots[(other, "after")][k]) for k, b in snapshots[other].items())


def test_resume_across_a_switch_is_bitwise(tmp_path):
    preset = tmp_path / "svd.yaml"
    preset.write_text(SVD_PRESET)
    sets = [a for s in FORCE for a in ("--set", s)]
    straight = run_cli("train", "--preset", str(preset), "--name", "straight", *sets, cwd=tmp_path, env=ONE_THREAD)
    assert straight.returncode == 0, straight.stderr
    records = svd_records(tmp_path / "runs/straight")
    first_switch = min(r["step"] for r in records if r["action"] == "to_lowrank")
    cut_micro = 2 * (first_switch + 2)  # two steps after the switch (2 micro-batches a step)
    assert first_switch + 2 < 30
    stopped = run_cli("train", "--preset", str(preset), "--name", "cut", *sets, cwd=tmp_path,
                      env={**ONE_THREAD, "LMKIT_TEST_SIGNAL": f"{cut_micro}:SIGTERM"})
    assert stopped.returncode == 143, stopped.stderr
    latest = torch.load(tmp_path / "runs/cut/checkpoints/latest.pt", weights_only=True)
    assert int(latest["model"]["transformer.h.0.attn.c_attn.svd_mode"]) == 1  # saved in low-rank mode
    resumed = run_cli("resume", "runs/cut", cwd=tmp_path, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    runs = tmp_path / "runs"
    assert_same_state(runs / "straight/checkpoints/latest.pt", runs / "cut/checkpoints/latest.pt")

    def comparable(run):
        return [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in svd_records(run)]

    assert comparable(runs / "cut") == comparable(runs / "straight")


def test_a_target_glob_that_matches_nothing_is_one_line_exit_2(tmp_path):
    preset = tmp_path / "svd.yaml"
    preset.write_text(SVD_PRESET)
    result = run_cli("train", "--preset", str(preset), "--set", "svd.targets=[transformer.h.9.*]", cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "svd.targets" in line and "transformer.h.9.*" in line and "transformer.h.0.attn.c_attn" in line
    assert not list((tmp_path / "runs").glob("*/checkpoints/*.pt")) if (tmp_path / "runs").exists() else True


@pytest.mark.parametrize("fold", [True])
def test_eval_and_export_work_on_an_svd_run_with_low_rank_layers(tmp_path, fold):
    pytest.importorskip("transformers")
    preset = tmp_path / "svd.yaml"
    # stop while layer 0 is low-rank: thresholds that switch once and never back
    preset.write_text(SVD_PRESET.replace("max_steps: 30", "max_steps: 12"))
    sets = ["--set", "svd.principal_danger=0.0"]
    trained = run_cli("train", "--preset", str(preset), "--name", "s", *sets, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    latest = torch.load(tmp_path / "runs/s/checkpoints/latest.pt", weights_only=True)
    assert int(latest["model"]["transformer.h.0.attn.c_attn.svd_mode"]) == 1
    ev = run_cli("eval", "runs/s", "--task", "perplexity", "--checkpoint", "latest", "--json", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    out = run_cli("export", "runs/s", "--to", "hf", str(tmp_path / "hf"), "--checkpoint", "latest", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "verified" in (out.stdout + out.stderr).lower()


def test_a_tied_head_is_refused_as_a_target(tmp_path):
    from lmkit.errors import ConfigError

    with pytest.raises(ConfigError, match="tied"):
        train_in_process(tmp_path, ["svd.targets=[lm_head]"])


def test_muon_keeps_its_momentum_warmup_across_the_rebuilds_of_a_switch(tmp_path):
    overrides = [*FORCE, "training.optimizer=muon", "training.embedding_lr=0.05", "training.head_lr=0.004",
                 "training.muon_momentum_warmup_steps=100", "model.qkv=separate", "model.bias=false",
                 "svd.targets=[transformer.h.0.attn.c_q, transformer.h.0.attn.c_v]"]
    trainer, _ = train_in_process(tmp_path, overrides)
    records = svd_records(trainer.run.path)
    rebuilt = {r["step"] for r in records if r["action"] in ("to_lowrank", "to_full", "refactor")}
    skipped = {r["step"] for r in records if r["action"] in ("to_lowrank", "to_full")}
    assert rebuilt and skipped
    # one count of the optimizer steps actually taken, through every rebuild (not since the last one)
    assert trainer.optimizer.steps_taken == 30 - len(skipped)


def test_a_refactor_step_under_a_loss_scaler_unscales_once(tmp_path, monkeypatch):
    # fp16 needs a GPU; on the CPU the same GradScaler code path runs with a forced scaler. A
    # power-of-two scale is exact in fp32, so with the gradients unscaled once the run equals
    # the unscaled one bit for bit; unscaling twice (the rebuilt optimizer unknown to the scaler)
    # would shrink the re-factor steps' updates by 1024.
    import lmkit.training.loop as loop

    real = torch.amp.GradScaler

    def run(scaled):
        if scaled:
            monkeypatch.setattr(loop.torch.amp, "GradScaler",
                                lambda device, enabled: real(device, init_scale=1024.0, enabled=True))
        else:
            monkeypatch.setattr(loop.torch.amp, "GradScaler", real)
        where = tmp_path / ("s" if scaled else "p")
        where.mkdir()
        trainer, _ = train_in_process(where, [*FORCE, "training.max_steps=14"])
        assert isinstance(trainer.scaler, real) and trainer.scaler.is_enabled() == scaled
        return trainer

    plain, scaled = run(False), run(True)
    actions = [r["action"] for r in svd_records(scaled.run.path)]
    assert "refactor" in actions
    a, b = plain.model.state_dict(), scaled.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_soft_capped_head_is_refused_as_a_target(tmp_path):
    from lmkit.errors import ConfigError

    with pytest.raises(ConfigError, match="not a plain linear"):
        train_in_process(tmp_path, ["svd.targets=[lm_head]", "model.tie_embeddings=false", "model.logit_softcap=15"])


@pytest.mark.parametrize("keep", [False, True])
def test_keep_optimizer_state_decides_what_a_switch_keeps(tmp_path, keep):
    seen = {}

    class OptState(TrainingHook):
        name = "opt_state"

        def before_step(self, trainer):
            p = trainer.model.get_submodule("transformer.h.1.mlp.c_fc").weight
            st = trainer.optimizer.state.get(p)
            seen[trainer.step + 1] = None if not st else st["exp_avg"].clone()

        def after_step(self, trainer, step):
            p = trainer.model.get_submodule("transformer.h.1.mlp.c_fc").weight
            st = trainer.optimizer.state.get(p)
            seen[(trainer.step, "after")] = None if not st else st["exp_avg"].clone()

    trainer, _ = train_in_process(tmp_path, [*FORCE, "training.max_steps=10",
                                             f"svd.keep_optimizer_state={str(keep).lower()}"], hooks=[OptState()])
    switch = min(r["step"] for r in svd_records(trainer.run.path) if r["action"] == "to_lowrank")
    before, after = seen[switch], seen[(switch, "after")]
    assert before is not None  # the layer that did not switch had its moments
    if keep:
        assert after is not None and torch.equal(before, after)  # kept, and not stepped (skipped update)
    else:
        assert after is None  # rebuilt fresh, as the original experiment did
