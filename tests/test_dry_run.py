"""``lmkit train --dry-run``: the plan equals what the trainer sets up, and nothing is written."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from typer.testing import CliRunner

from lmkit.config import build_run_config
from lmkit.dry_run import local_fingerprint, plan_run


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _trainer_plan(config):
    """The trainer's own numbers (a real set-up in a scratch folder, no step trained)."""
    from lmkit.training.loop import Trainer

    trainer = Trainer(config)
    trainer.setup()
    try:
        return {"max_steps": trainer.max_steps, "steps_per_epoch": trainer.steps_per_epoch,
                "micro_per_epoch": trainer.micro_per_epoch, "n_params": trainer.n_params}
    finally:
        trainer.run.unlock()


def _config(tmp_path, preset_text, sets=(), out="runs"):
    preset = tmp_path / "p.yaml"
    preset.write_text(preset_text)
    return build_run_config(str(preset), list(sets), {"out_dir": ("--out-dir", str(tmp_path / out))})


def test_arithmetic_plan_is_the_trainers(tmp_path):
    from conftest import TINY_PRESET

    text = TINY_PRESET.format(pos="rope", steps=40, eval_interval=20, ckpt_interval=10)
    sets = ["training.epochs=3", "training.max_steps=null", "training.grad_accum_steps=2"]
    report = plan_run(_config(tmp_path, text, sets, out="dry"))
    assert not (tmp_path / "dry").exists()
    ref = _trainer_plan(_config(tmp_path, text, sets, out="ref"))
    plan = report["plan"]
    assert (plan["max_steps"], plan["steps_per_epoch"]) == (ref["max_steps"], ref["steps_per_epoch"])
    assert report["data"]["micro_per_epoch"] == ref["micro_per_epoch"] and report["data"]["exact"]
    assert report["params"]["total"] == ref["n_params"]
    assert plan["tokens_per_step"] == 16 * 2 * 32 and plan["total_tokens"] == ref["max_steps"] * 16 * 2 * 32
    assert plan["epochs"] == pytest.approx(ref["max_steps"] * 2 / ref["micro_per_epoch"])


TEXT_PRESET = """\
model: {n_layer: 1, n_head: 2, n_embd: 16, d_ff: 32, block_size: 16, dropout: 0.0}
data: {dataset: DATA, tokenizer: byte}
training: {batch_size: 4, epochs: 2, warmup_steps: 1, tensorboard: false}
"""


def _corpus(tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "train.txt").write_text("".join(f"line {i} of the training text, a little longer.\n" for i in range(300)))
    (data / "valid.txt").write_text("".join(f"validation line {i}.\n" for i in range(40)))
    return data


def test_text_plan_exact_from_the_token_cache_estimated_without(tmp_path):
    data = _corpus(tmp_path)
    text = TEXT_PRESET.replace("DATA", str(data))
    cache = tmp_path.parent / "lmkit-cache"  # conftest's LMKIT_CACHE_DIR (shared by the session)
    hf_home = tmp_path.parent / "hf-home"
    before = (_files(cache), _files(hf_home))
    est = plan_run(_config(tmp_path, text, out="dry"))
    assert (_files(cache), _files(hf_home)) == before  # no token cache, no datasets cache
    assert not (tmp_path / "dry").exists()
    assert est["data"]["exact"] is False and "estimated" in est["data"]["source"]
    n_bytes = (data / "train.txt").stat().st_size
    assert est["data"]["bytes"] == n_bytes and est["data"]["train_size"] == n_bytes  # byte tokenizer: 1 byte/token

    ref = _trainer_plan(_config(tmp_path, text, out="ref"))  # builds the token cache
    exact = plan_run(_config(tmp_path, text, out="dry"))
    assert exact["data"]["exact"] is True and "token cache" in exact["data"]["source"]
    assert exact["data"]["micro_per_epoch"] == ref["micro_per_epoch"]
    assert (exact["plan"]["max_steps"], exact["plan"]["steps_per_epoch"]) == (ref["max_steps"], ref["steps_per_epoch"])
    assert exact["params"]["total"] == ref["n_params"]
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize("single_file", [False, True])
def test_local_fingerprint_is_the_sources(tmp_path, single_file):
    from lmkit.data.sources import load_text_source

    data = _corpus(tmp_path)
    dataset = data / "train.txt" if single_file else data
    config = _config(tmp_path, TEXT_PRESET.replace("DATA", str(dataset)))
    assert local_fingerprint(config.data) == load_text_source(config.data).fingerprint


def test_cli_gpu_only_124m_preset_on_this_cpu(tmp_path, monkeypatch):
    from lmkit.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--preset", "medium", "--gpu-only", "--bf16", "--max-steps", "100",
                                      "--dry-run"])
    assert result.exit_code == 0, result.output
    assert os.listdir(tmp_path) == []  # no runs/, nothing else
    out = result.output
    resolved = yaml.safe_load(out.split("\nmodel gpt")[0])
    assert resolved["training"]["max_steps"] == 100 and resolved["training"]["precision"] == "bf16"
    assert resolved["model"]["n_layer"] == 12 and resolved["training"]["gpu_only"] is True
    assert "124,439,808 params" in out  # GPT-2 small (Radford et al. 2019; HF gpt2: 124,439,808)
    assert "plan: 100 optimizer steps, 32,768 tokens/step, 3,276,800 tokens" in out
    assert "requires a GPU" in out

    result = CliRunner().invoke(app, ["train", "--preset", "medium", "--dry-run", "--json"])
    report = json.loads(result.output)
    from lmkit.analysis.memory import estimate_memory

    cfg = build_run_config("medium", [], {})
    cfg.model.vocab_size = 50257
    assert report["memory"]["total_bytes"] == estimate_memory(cfg.model, 32, device="cuda").total
    assert report["plan"]["steps_exact"] is False  # 20 epochs of WikiText-103: from its size
    assert os.listdir(tmp_path) == []


def test_dry_run_with_resume_is_refused(tmp_path, monkeypatch):
    from lmkit.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--name", "x", "--resume", "--dry-run"])
    assert result.exit_code == 2 and "--dry-run" in result.output


def test_missing_local_data_is_the_trainers_error(tmp_path):
    from lmkit.errors import DataError

    config = _config(tmp_path, TEXT_PRESET.replace("DATA", str(tmp_path / "nope.txt")).replace("epochs: 2", "max_steps: 5"))
    with pytest.raises(DataError, match="is not a file or folder"):
        plan_run(config)


def test_mixture_plans_its_steps_without_a_size(tmp_path):
    data = _corpus(tmp_path)
    text = (TEXT_PRESET.replace("data: {dataset: DATA, tokenizer: byte}",
                                f"data: {{dataset: mixture, tokenizer: byte, sources: [{{dataset: {data / 'train.txt'}}}, "
                                f"{{dataset: {data / 'valid.txt'}}}]}}")
            .replace("epochs: 2", "max_steps: 7"))
    report = plan_run(_config(tmp_path, text))
    assert report["data"]["train_size"] is None and report["data"]["exact"] is False
    assert report["plan"]["max_steps"] == 7 and report["plan"]["total_tokens"] == 7 * 4 * 16
    assert report["plan"]["epochs"] is None


def test_chat_plan_counts_conversations_as_the_trainer_does(tmp_path):
    """Chat data trains one conversation per row: the plan counts rows, not bytes / block."""
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}. #### {2 * i}"} for i in range(23)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = TEXT_PRESET.replace("DATA", str(data)).replace("tokenizer: byte}", "tokenizer: byte, format: chat}")
    text = text.replace("block_size: 16", "block_size: 64")
    report = plan_run(_config(tmp_path, text, ["data.val_fraction=0.2"], out="dry"))
    assert not (tmp_path / "dry").exists()
    ref = _trainer_plan(_config(tmp_path, text, ["data.val_fraction=0.2"], out="ref"))
    assert report["data"]["exact"] and report["data"]["micro_per_epoch"] == ref["micro_per_epoch"]
    assert (report["plan"]["max_steps"], report["plan"]["steps_per_epoch"]) == (ref["max_steps"],
                                                                                ref["steps_per_epoch"])
