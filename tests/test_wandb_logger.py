"""W&B as an observer: a stand-in ``wandb`` module (fast) and one real offline run."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest

from lmkit.config import build_run_config
from lmkit.errors import ConfigError
from lmkit.events import EvalResult, RunFinished, RunStarted, StepMetrics, SVDAnalysis


class FakeRun:
    def __init__(self, kwargs):
        self.kwargs = kwargs
        self.logged: list[dict] = []
        self.metrics: dict[str, str | None] = {}
        self.config = types.SimpleNamespace(values=dict(kwargs["config"]), update=self._update_config)
        self.summary: dict = {}
        self.exit_code = None

    def _update_config(self, values, allow_val_change=False):
        self.config.values.update(values)

    def define_metric(self, name, step_metric=None):
        self.metrics[name] = step_metric

    def log(self, record):
        self.logged.append(dict(record))

    def finish(self, exit_code=0):
        self.exit_code = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs):
        run = FakeRun(kwargs)
        module.runs.append(run)
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    return module


def tiny_config(tmp_path, steps=10, **training):
    from conftest import TINY_PRESET

    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_PRESET.format(pos="rope", steps=steps, eval_interval=5, ckpt_interval=5))
    sets = [f"training.{k}={v}" for k, v in training.items()]
    return build_run_config(str(preset), sets, {"out_dir": ("--out-dir", str(tmp_path / "runs")),
                                                "name": ("--name", "w")})


def test_writer_logs_the_tensorboard_keys_config_and_summary(fake_wandb, tmp_path):
    from lmkit.monitor.wandb import WandbWriter
    from lmkit.rundir import RunDir

    cfg = tiny_config(tmp_path, **{"wandb_project": "proj", "wandb_entity": "me"})
    run = RunDir(tmp_path / "runs" / "w")
    run.path.mkdir(parents=True)
    writer = WandbWriter(cfg, run, resumed=False)
    (fake,) = fake_wandb.runs
    assert fake.kwargs["project"] == "proj" and fake.kwargs["entity"] == "me" and fake.kwargs["name"] == "w"
    assert fake.kwargs["config"]["training"]["lr"] == cfg.training.lr
    assert fake.kwargs["dir"] == str(run.path)
    assert json.loads((run.path / "wandb.json").read_text())["id"] == fake.kwargs["id"]

    writer(RunStarted(name="w", run_dir=str(run.path), preset="tiny", model_type="gpt", n_params=1234,
                      device="cpu", device_name="cpu", precision="fp32", compile=False, max_steps=10,
                      steps_per_epoch=5, tokens_per_step=512))
    writer(StepMetrics(step=5, max_steps=10, epoch=0.5, tokens=2560, loss=2.5, lr=1e-3, grad_norm=0.7,
                       tok_per_s=100.0, step_time_s=0.1, mfu=None, gpu_mem_gb=None, elapsed_s=1.0))
    writer(EvalResult(step=5, epoch=0.5, tokens=2560, split="val", loss=2.4, metrics={"ppl": 11.0},
                      is_best=True, elapsed_s=1.0))
    writer(SVDAnalysis(step=5, layer="h.0.attn.c_q", mode="full", r=None, r_next=4,
                       metrics={"principal_alignment": 0.3, "subspace_angle": float("nan")}, reason="x",
                       action="to_lowrank", mode_after="lowrank", r_after=4))
    writer(RunFinished(status="completed", summary={"steps": 10, "best_val_loss": 2.4, "final_val_loss": None,
                                                    "wall_time_s": float("inf")}))
    assert fake.logged == [
        {"train/loss": 2.5, "train/lr": 1e-3, "train/tok_per_s": 100.0, "train/grad_norm": 0.7, "step": 5},
        {"val/loss": 2.4, "val/ppl": 11.0, "step": 5},
        {"svd/h.0.attn.c_q/principal_alignment": 0.3, "svd/h.0.attn.c_q/mode": 1.0, "svd/h.0.attn.c_q/r": 4,
         "step": 5},
    ]
    assert fake.metrics["train/*"] == fake.metrics["val/*"] == "step"
    assert fake.config.values["n_params"] == 1234
    assert fake.summary == {"steps": 10, "best_val_loss": 2.4, "status": "completed"}
    assert fake.exit_code == 0
    writer(StepMetrics(step=6, max_steps=10, epoch=0.6, tokens=1, loss=1.0, lr=1.0, grad_norm=None,
                       tok_per_s=1.0, step_time_s=0.1, mfu=None, gpu_mem_gb=None, elapsed_s=1.0))
    assert len(fake.logged) == 3  # nothing after finish()


def test_training_logs_what_metrics_jsonl_gets(fake_wandb, tmp_path):
    from lmkit.training.loop import train

    cfg = tiny_config(tmp_path, steps=6, loggers="[wandb]", wandb_run_name="nice", eval_iters=2)
    train(cfg)
    (first,) = fake_wandb.runs
    assert first.kwargs["name"] == "nice" and first.kwargs["project"] == "lmkit"
    lines = [json.loads(line) for line in (tmp_path / "runs" / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in first.logged if "train/loss" in r] == [
        (r["step"], r["loss"]) for r in lines if r["split"] == "train"]
    assert [(r["step"], r["val/loss"]) for r in first.logged if "val/loss" in r] == [
        (r["step"], r["loss"]) for r in lines if r["split"] == "val"]
    summary = json.loads((tmp_path / "runs" / "w" / "summary.json").read_text())
    assert first.summary["status"] == "completed" and first.summary["steps"] == summary["steps"] == 6
    assert first.summary["best_val_loss"] == summary["best_val_loss"] and first.exit_code == 0
    assert not any((tmp_path / "runs" / "w" / "tb").glob("events.*"))  # loggers: [wandb] only


def test_resume_continues_the_same_wandb_run(fake_wandb, tmp_path):
    from lmkit.monitor.wandb import WandbWriter
    from lmkit.rundir import RunDir

    cfg = tiny_config(tmp_path)
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    WandbWriter(cfg, run, resumed=False)
    WandbWriter(cfg, run, resumed=True)
    WandbWriter(cfg, run, resumed=False)  # a new run in a reused folder: a new W&B run
    first, again, fresh = fake_wandb.runs
    assert again.kwargs["id"] == first.kwargs["id"] and again.kwargs["resume"] == "allow"
    assert fresh.kwargs["id"] != first.kwargs["id"]
    (run.path / "wandb.json").unlink()
    WandbWriter(cfg, run, resumed=True)  # the id file is gone: a new W&B run, no error
    assert fake_wandb.runs[-1].kwargs["id"] not in (first.kwargs["id"], fresh.kwargs["id"])


def test_missing_package_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    from lmkit.monitor.wandb import WandbWriter
    from lmkit.rundir import RunDir

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'lmkit\[wandb\]'"):
        WandbWriter(tiny_config(tmp_path), RunDir(tmp_path), resumed=False)


@pytest.mark.slow
def test_real_wandb_offline_run_file_holds_the_keys(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lmkit.training.loop import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    import wandb

    wandb.teardown()  # an earlier test's W&B session (other WANDB_* settings) must not carry over
    train(tiny_config(tmp_path, steps=5, loggers="[wandb]", eval_iters=2))
    files = list((tmp_path / "wb").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    deadline = time.monotonic() + 30  # W&B's own process writes the file after finish() returns
    while b"best_val_loss" not in (blob := files[0].read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    run_id = json.loads((tmp_path / "runs" / "w" / "wandb.json").read_text())["id"]
    assert run_id in files[0].name
    for key in (b"train/loss", b"train/lr", b"val/loss", b"best_val_loss", b"n_embd"):
        assert key in blob, key


def test_failing_wandb_init_is_one_config_error_line_suggesting_login_or_offline(fake_wandb, tmp_path):
    from lmkit.monitor.wandb import WandbWriter
    from lmkit.rundir import RunDir

    errors = types.ModuleType("wandb.errors")

    class Error(Exception):
        pass

    class UsageError(Error):
        pass

    errors.Error, errors.UsageError = Error, UsageError
    fake_wandb.errors = errors

    def init(**kwargs):
        raise UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore detail here")

    fake_wandb.init = init
    cfg = tiny_config(tmp_path)
    with pytest.raises(ConfigError) as info:
        WandbWriter(cfg, RunDir(tmp_path / "runs" / "w"), resumed=False)
    message = str(info.value)
    assert "\n" not in message and "api_key not configured" in message and "more detail" not in message
    assert "wandb login" in message and "WANDB_MODE=offline" in message
    # an error that is not wandb's is not relabelled
    fake_wandb.init = lambda **kwargs: (_ for _ in ()).throw(TypeError("a bug"))
    with pytest.raises(TypeError, match="a bug"):
        WandbWriter(cfg, RunDir(tmp_path / "runs" / "w"), resumed=False)
