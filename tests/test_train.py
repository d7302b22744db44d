"""Short real training runs: loss falls, the run directory is complete and readable."""

import json
import math

import pytest
import torch

from lmkit.config import build_run_config, load_run_config
from lmkit.data.tokenizers import load_tokenizer
from lmkit.errors import ConfigError
from lmkit.events import CheckpointSaved, EvalResult, RunFinished, RunStarted, StepMetrics
from lmkit.training.checkpoint import load_checkpoint
from lmkit.training.loop import Trainer, train
from lmkit.training.schedule import lr_multiplier

from conftest import TINY_PRESET, shared


def run_config(preset, tmp_path, *overrides, name="run"):
    return build_run_config(str(preset), list(overrides),
                            {"out_dir": ("--out-dir", str(tmp_path / "runs")), "name": ("--name", name)})


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
    """One 40-step arithmetic run shared by the run-directory tests."""
    tmp = tmp_path_factory.mktemp("arith")
    preset = tmp / "tiny.yaml"
    preset.write_text(TINY_PRESET.format(pos="rope", steps=40, eval_interval=20, ckpt_interval=10))
    events = []
    config = run_config(preset, tmp, "training.grad_accum_steps=2")
    trainer = Trainer(config, emit=events.append)
    summary = trainer.run()
    return trainer, summary, events


def test_loss_decreases_on_arithmetic(arithmetic_run):
    _, summary, events = arithmetic_run
    evals = [e for e in events if isinstance(e, EvalResult)]
    assert [e.step for e in evals] == [0, 20, 40]
    assert evals[-1].loss < evals[0].loss - 0.8
    assert {"ppl", "acc_val", "acc_flat", "acc_paren", "paren_gap"} <= set(evals[-1].metrics)
    assert summary["status"] == "completed" and summary["steps"] == 40
    assert summary["best_val_loss"] == pytest.approx(min(e.loss for e in evals))


def test_scheduler_steps_once_per_optimizer_step(arithmetic_run):
    trainer, _, events = arithmetic_run
    assert trainer.scheduler.last_epoch == trainer.step == 40
    assert trainer.micro_step == 80  # grad_accum_steps=2
    steps = [e for e in events if isinstance(e, StepMetrics)]
    # The LR logged at a step is the one that step used: step 40 ran at mult(39).
    expected = 3e-3 * lr_multiplier(39, schedule="cosine", warmup_steps=5, total_steps=40, min_lr_ratio=0.1)
    assert steps[-1].lr == pytest.approx(expected, rel=1e-9)
    # the default warmup form (s+1)/W: the first step trains at peak / W (nanoGPT), not at 0
    assert steps[0].step == 1 and steps[0].lr == pytest.approx(3e-3 / 5, rel=1e-12)


def test_run_directory_contents(arithmetic_run):
    trainer, summary, _ = arithmetic_run
    run = trainer.run.path
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "events.jsonl", "tb",
                                                "checkpoints", "tokenizer", "summary.json"}
    config = load_run_config(run / "config.yaml")
    assert config.model.vocab_size == 35 and config.name == "run"

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    assert [r["step"] for r in records if r["split"] == "val"] == [0, 20, 40]
    assert all({"tokens", "loss", "lr", "tok_per_s"} <= set(r) for r in records if r["split"] == "train")

    kinds = [json.loads(line)["kind"] for line in (run / "events.jsonl").read_text().splitlines()]
    assert kinds[0] == "data_ready" and kinds[1] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.count("checkpoint") >= 4

    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert load_tokenizer(run / "tokenizer").vocab_size == 35
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["params"] == sum(p.numel() for p in trainer.model.parameters())


def test_checkpoints_are_weights_only_and_pruned(arithmetic_run):
    trainer, _, events = arithmetic_run
    ckpts = trainer.run.checkpoints
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["best.pt", "latest.pt", "step_0000030.pt", "step_0000040.pt"]  # keep_last: 2
    state = torch.load(ckpts / "latest.pt", weights_only=True)
    assert state["step"] == 40 and state["micro_step"] == 80
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model"])
    model = trainer.model
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state["model"][key], value.cpu())
    best = load_checkpoint(ckpts / "best.pt")
    assert best["step"] == trainer.best_step
    saved = [e for e in events if isinstance(e, CheckpointSaved)]
    assert saved[-1].tags[0] == "latest"


def test_language_model_on_real_text(tmp_path):
    text = shared("tinyshakespeare", "input.txt")
    preset = tmp_path / "lm.yaml"
    preset.write_text(
        "model: {n_layer: 2, n_head: 2, n_embd: 64, block_size: 64, pos_encoding: learned, dropout: 0.0}\n"
        f"data: {{dataset: '{text}', tokenizer: bpe, bpe_vocab_size: 512}}\n"
        "training: {batch_size: 16, max_steps: 60, lr: 3.0e-3, warmup_steps: 5, eval_interval: 30,"
        " eval_iters: 8, log_interval: 10}\n"
    )
    events = []
    summary = train(run_config(preset, tmp_path), emit=events.append)
    evals = [e for e in events if isinstance(e, EvalResult)]
    assert [e.step for e in evals] == [0, 30, 60]
    assert evals[0].loss == pytest.approx(math.log(512), abs=0.3)
    assert evals[-1].loss < evals[0].loss - 1.0
    assert evals[-1].metrics["ppl"] == pytest.approx(math.exp(evals[-1].loss))
    started = [e for e in events if isinstance(e, RunStarted)][0]
    assert started.tokens_per_step == 16 * 64 and started.n_params == summary["params"]
    assert isinstance(events[-1], RunFinished)


def test_existing_run_name_is_refused_before_any_work(arithmetic_run, tmp_path):
    trainer, _, _ = arithmetic_run
    config = build_run_config("pilot", [], {"out_dir": ("--out-dir", str(trainer.run.path.parent)),
                                            "name": ("--name", "run")})
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(config).run()


def test_block_size_too_small_for_examples(tmp_path, tiny_preset):
    config = run_config(tiny_preset, tmp_path, "model.block_size=12")
    with pytest.raises(ConfigError, match="block_size: 12 is shorter than the longest example"):
        Trainer(config).run()
    assert not (tmp_path / "runs" / "run").exists()  # nothing written


def test_fp16_on_cpu_is_refused(tmp_path, tiny_preset):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = run_config(tiny_preset, tmp_path, "training.precision=fp16", "training.device=cpu")
    with pytest.raises(ConfigError, match="fp16 mixed precision needs a GPU"):
        Trainer(config).run()


def test_bf16_autocast_trains_on_cpu(tmp_path, tiny_preset):
    config = run_config(tiny_preset, tmp_path, "training.precision=bf16", "training.device=cpu",
                        "training.max_steps=6", "training.eval_interval=6", "training.tensorboard=false")
    summary = train(config)
    assert summary["precision"] == "bf16" and math.isfinite(summary["final_val_loss"])
