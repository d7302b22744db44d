"""init_from RUN[:CHECKPOINT]: weights, architecture and tokenizer from another lmkit run; fresh optimizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmkit.config import build_run_config
from lmkit.errors import CheckpointError, ConfigError
from lmkit.runs import load_run
from lmkit.training.loop import Trainer, resume, train

from conftest import shared

BASE_PRESET = """\
model: {{n_layer: 2, n_head: 2, n_embd: 32, d_ff: 64, block_size: 32, pos_encoding: learned, dropout: 0.0}}
data: {{dataset: {data}, tokenizer: bpe, bpe_vocab_size: 300, val_fraction: 0.2}}
training: {{batch_size: 8, max_steps: 10, lr: 3.0e-3, warmup_steps: 2, warmup_form: "s/W", eval_interval: 5,
           eval_iters: 2, checkpoint_interval: 5, tensorboard: false, seed: 1, threads: 1}}
"""
# A fine-tuning preset: other text, no model section and no tokenizer (both come from the source).
FT_PRESET = """\
data: {{dataset: {data}, val_fraction: 0.2}}
training: {{batch_size: 8, max_steps: 3, lr: 1.0e-3, schedule: constant, warmup_steps: 0, eval_interval: 3,
           eval_iters: 2, checkpoint_interval: 3, tensorboard: false, seed: 5, log_interval: 1, threads: 1}}
"""


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    """The presets train on one thread (fast on a loaded machine); give the others theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny trained run on Shakespeare (a BPE tokenizer trained on it, learned positions, 10 steps, evaluated
    and saved at 5 and 10) and a fine-tuning preset on other Shakespeare text."""
    root = tmp_path_factory.mktemp("init-from")
    mp = pytest.MonkeyPatch()
    mp.setenv("LMKIT_CACHE_DIR", str(root / "cache"))
    text = shared("tinyshakespeare", "input.txt").read_text(encoding="utf-8")
    (root / "pre.txt").write_text(text[:8000], encoding="utf-8")
    (root / "sft.txt").write_text(text[20000:26000], encoding="utf-8")
    (root / "base.yaml").write_text(BASE_PRESET.format(data=root / "pre.txt"))
    train(build_run_config(str(root / "base.yaml"), [],
                           {"out_dir": ("--out-dir", str(root)), "name": ("--name", "base")}))
    (root / "ft.yaml").write_text(FT_PRESET.format(data=root / "sft.txt"))
    yield root
    mp.undo()


def _config(root: Path, name: str, init_from: str, sets: list[str] = (), preset: str = "ft.yaml"):
    return build_run_config(str(root / preset), list(sets), {
        "out_dir": ("--out-dir", str(root)), "name": ("--name", name), "init_from": ("--init-from", init_from)})


def _set_up(config) -> Trainer:
    trainer = Trainer(config)
    trainer.setup()
    trainer.run.unlock()
    return trainer


def _equal_states(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_weights_architecture_and_tokenizer_come_from_the_run(base):
    trainer = _set_up(_config(base, "ft-weights", "base:step_0000005"))
    source = load_run(base / "base", "step_0000005")
    assert _equal_states(trainer.model.state_dict(), source.model.state_dict())
    assert not _equal_states(trainer.model.state_dict(), load_run(base / "base", "latest").model.state_dict())
    assert trainer.config.model == source.config.model  # the ft preset named no architecture
    # a fresh optimizer and schedule: nothing carried over from the source's 10 steps
    assert trainer.step == 0 and trainer.tokens == 0 and not trainer.optimizer.state
    assert trainer.scheduler.last_epoch == 0 and trainer.optimizer.param_groups[0]["lr"] == 1.0e-3
    assert trainer.data.tokenizer.fingerprint() == source.tokenizer.fingerprint()
    record = trainer.init_source.record()
    assert record["kind"] == "run" and record["step"] == 5 and record["checkpoint_name"] == "step_0000005"
    assert record["path"] == str((base / "base").resolve())
    assert any("init_from base:step_0000005" in note for _, note in trainer.notes)


def test_default_checkpoint_is_best_and_the_run_records_its_source(base):
    summary = train(_config(base, "ft-run", str(base / "base")))
    best = json.loads((base / "base" / "summary.json").read_text())["best_step"]
    assert summary["steps"] == 3 and summary["init_from"]["step"] == best
    assert summary["init_from"]["checkpoint_name"] == "best"
    assert summary["init_from"]["tokenizer_fingerprint"] == load_run(base / "base").tokenizer.fingerprint()
    stored = json.loads((base / "ft-run" / "summary.json").read_text())
    assert stored["init_from"] == summary["init_from"]
    config = (base / "ft-run" / "config.yaml").read_text()
    assert f"init_from: {base / 'base'}" in config and "n_layer: 2" in config
    assert "optimizer and LR schedule start fresh" in (base / "ft-run" / "events.jsonl").read_text()


def test_resume_continues_the_fine_tune_not_the_source(base, tmp_path):
    straight = train(_config(base, "ft-straight", "base", ["training.max_steps=6"]))
    train(_config(base, "ft-split", "base"))  # 3 steps
    aside = tmp_path / "base-moved"
    shutil.copytree(base / "base", aside)
    shutil.rmtree(base / "base")  # the resume must not need the source
    try:
        summary = resume(base / "ft-split", flags={"training.max_steps": ("--max-steps", 6)})
    finally:
        shutil.copytree(aside, base / "base")
    assert summary["steps"] == straight["steps"] == 6
    assert summary["init_from"] == straight["init_from"]  # the record survives the resume (from the checkpoint)
    # the continuation equals the uninterrupted fine-tune: it resumed step 3 of ft-split, not the source
    assert _equal_states(load_run(base / "ft-split", "latest").model.state_dict(),
                         load_run(base / "ft-straight", "latest").model.state_dict())


def test_block_size_crop_and_dropout_may_differ(base):
    trainer = _set_up(_config(base, "ft-crop", "base", ["model.block_size=16", "model.dropout=0.2"]))
    source = load_run(base / "base").model.state_dict()
    assert trainer.config.model.block_size == 16 and trainer.config.model.dropout == 0.2
    wpe = trainer.model.state_dict()["transformer.wpe.weight"]
    assert wpe.shape[0] == 16 and torch.equal(wpe, source["transformer.wpe.weight"][:16])
    longer = _set_up(_config(base, "ft-long", "base", ["model.block_size=64"]))
    assert longer.config.model.block_size == 32  # learned positions: capped at the source's, with a warning
    assert any(level == "warning" and "longer than the 32 positions" in note for level, note in longer.notes)


@pytest.mark.parametrize("sets, key", [(["model.n_layer=3"], "model.n_layer"),
                                       (["model.pos_encoding=rope"], "model.pos_encoding"),
                                       (["data.tokenizer=char"], "data.tokenizer")])
def test_a_config_naming_another_architecture_or_tokenizer_is_refused(base, sets, key):
    with pytest.raises(ConfigError) as err:
        train(_config(base, "ft-bad", "base", sets))
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message and "drop" in message
    assert not (base / "ft-bad").exists()  # refused before a run folder was claimed


def test_bad_sources_are_one_line_errors(base):
    with pytest.raises(ConfigError, match="no run there"):
        train(_config(base, "ft-x", "nosuchrun"))
    with pytest.raises(CheckpointError, match="step_0000099"):
        train(_config(base, "ft-x", "base:step_0000099"))
    assert not (base / "ft-x").exists()


@pytest.mark.parametrize("preset", ["sft-gsm8k", "sft-tulu"])
def test_sft_presets_need_init_from(preset):
    config = build_run_config(preset)
    assert config.data.format == "chat" and config.training.lr == 2.0e-5 and config.training.schedule == "linear"
    assert set(config.model.model_fields_set) == {"block_size", "dropout"}  # no architecture of their own
    with pytest.raises(ConfigError, match="--init-from RUN"):
        train(config)


def test_sft_gsm8k_is_the_original_recipe():
    config = build_run_config("sft-gsm8k")
    t = config.training
    assert (t.epochs, t.batch_size * t.grad_accum_steps, config.model.block_size) == (3, 32, 512)
    assert (t.weight_decay, t.betas, t.warmup_form, t.min_lr_ratio) == (0.01, (0.9, 0.999), "s/W", 0.0)
    assert config.data.dataset.endswith("gsm8k/train.jsonl")


def test_an_sft_preset_on_a_mul_tokens_run_takes_its_condition_and_caps_block_size():
    """merge_config alone, on a stand-in of a gpt2-mul-tiny run (learned positions, 128 long)."""
    from lmkit.config import DataConfig, GPTConfig
    from lmkit.data.tokenizers import ByteTokenizer
    from lmkit.training.init_from import InitSource, merge_config

    model = GPTConfig(n_layer=2, n_head=2, n_embd=64, d_ff=256, block_size=128, vocab_size=50349,
                      activation="gelu_tanh", pos_encoding="learned")
    source = InitSource(spec="runs/mul", kind="run", path="/runs/mul", model_config=model, state={},
                        tokenizer=ByteTokenizer(), tokenizer_name="gpt2+mul", step=300,
                        data_config=DataConfig(tokenizer="gpt2+mul", condition="mul_tokens", dataset="x.txt"))
    config = build_run_config("sft-gsm8k")
    notes = merge_config(config, source)
    assert config.model == model  # 512 asked, 128 learned positions: capped, with a warning
    assert any(level == "warning" and "using 128" in note for level, note in notes)
    assert (config.data.tokenizer, config.data.condition, config.data.format) == ("gpt2+mul", "mul_tokens", "chat")
    explicit = build_run_config("sft-gsm8k", ["data.condition=baseline", "model.dropout=0.1"])
    merge_config(explicit, source)
    assert explicit.data.condition == "baseline" and explicit.model.dropout == 0.1
