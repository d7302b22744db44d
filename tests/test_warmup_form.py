"""training.warmup_form: the two warmup conventions, against hand-written LR sequences and
nanoGPT's get_lr written out independently; every preset sets it; resume keeps it."""

from __future__ import annotations

import math

import pytest
import torch

from lmkit.config import build_run_config
from lmkit.errors import ConfigError
from lmkit.training.schedule import build_scheduler, lr_multiplier, steps_to_peak


def nanogpt_get_lr(it: int, *, max_lr: float, warmup_steps: int, max_steps: int, min_lr: float) -> float:
    """Karpathy's build-nanogpt ``train_gpt2.py`` get_lr (the GPT-2 124M recipe of
    domain-token-gpt2, SEEDS_SPEC 1.8), as published."""
    if it < warmup_steps:
        return max_lr * (it + 1) / warmup_steps
    if it > max_steps:
        return min_lr
    decay_ratio = (it - warmup_steps) / (max_steps - warmup_steps)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (max_lr - min_lr)


def _lrs(n: int, **kw) -> list[float]:
    """The LR each of the first ``n`` optimizer steps trains with, through a real LambdaLR."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, **kw)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# W=4, S=10, m=0.1, peak 1: worked by hand. Cosine part: p = (s-4)/6, mult = 0.1 + 0.45 (1 + cos(pi p)),
# cos(pi/6) = 0.866025, cos(pi/3) = 0.5, cos(pi/2) = 0, cos(2pi/3) = -0.5, cos(5pi/6) = -0.866025.
COSINE_TAIL = [1.0, 0.939711, 0.775, 0.55, 0.325, 0.160289, 0.1]
HAND = {
    "s/W": [0.0, 0.25, 0.5, 0.75] + COSINE_TAIL,
    "(s+1)/W": [0.25, 0.5, 0.75, 1.0] + COSINE_TAIL,
}


@pytest.mark.parametrize("form", ["s/W", "(s+1)/W"])
def test_lr_sequence_matches_the_hand_written_one(form):
    got = _lrs(11, schedule="cosine", warmup_steps=4, total_steps=10, min_lr_ratio=0.1, warmup_form=form)
    assert got == pytest.approx(HAND[form], abs=1e-6)


def test_linear_schedule_with_each_form():
    # W=2, S=6, m=0 (the arithmetic presets' shape): linear decay p = (s-2)/4
    assert _lrs(7, schedule="linear", warmup_steps=2, total_steps=6, min_lr_ratio=0.0, warmup_form="s/W") \
        == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert _lrs(7, schedule="linear", warmup_steps=2, total_steps=6, min_lr_ratio=0.0, warmup_form="(s+1)/W") \
        == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert steps_to_peak(2, "s/W") == 3 and steps_to_peak(2, "(s+1)/W") == 2 and steps_to_peak(0, "s/W") == 1


def test_gpt2_124m_preset_follows_nanogpt_get_lr():
    t = build_run_config("gpt2-124m").training
    assert t.warmup_form == "(s+1)/W"
    ref = dict(max_lr=t.lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps, min_lr=t.lr * t.min_lr_ratio)
    assert (ref["max_lr"], ref["warmup_steps"], ref["max_steps"]) == (6e-4, 715, 19073)
    for it in [0, 1, 2, 100, 713, 714, 715, 716, 5000, 9894, 19000, 19072]:
        ours = t.lr * lr_multiplier(it, schedule=t.schedule, warmup_steps=t.warmup_steps, total_steps=t.max_steps,
                                    min_lr_ratio=t.min_lr_ratio, warmup_form=t.warmup_form)
        assert ours == pytest.approx(nanogpt_get_lr(it, **ref), rel=1e-12, abs=1e-15), it
    # the other form differs exactly during warmup: step 1 trains at LR 0
    assert lr_multiplier(0, schedule="cosine", warmup_steps=715, total_steps=19073, min_lr_ratio=0.1,
                         warmup_form="s/W") == 0.0


def test_arithmetic_and_wikitext_presets_start_at_lr_zero():
    for name in ("pilot", "scale_10m", "tiny", "small", "medium"):
        t = build_run_config(name).training
        assert t.warmup_form == "s/W", name
        assert lr_multiplier(0, schedule=t.schedule, warmup_steps=t.warmup_steps, total_steps=10 * t.warmup_steps,
                             min_lr_ratio=t.min_lr_ratio, warmup_form=t.warmup_form) == 0.0


def test_default_for_new_configs_and_bad_values(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: {n_layer: 1, n_head: 1, n_embd: 8, block_size: 8}\n"
                      "data: {dataset: arithmetic, tokenizer: char}\ntraining: {max_steps: 5, warmup_steps: 2}\n")
    assert build_run_config(str(preset)).training.warmup_form == "(s+1)/W"
    with pytest.raises(ConfigError, match="warmup_form") as info:
        build_run_config(str(preset), ["training.warmup_form=s+1/W"])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="warmup_form"):
        lr_multiplier(0, schedule="cosine", warmup_steps=2, total_steps=5, min_lr_ratio=0.1, warmup_form="one")


def test_resume_keeps_the_warmup_form(tmp_path):
    from lmkit.config import load_run_config
    from lmkit.training.resume import SAFE_KEYS, resume_config

    assert "training.warmup_form" not in SAFE_KEYS
    config = build_run_config("pilot")
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert load_run_config(path).training.warmup_form == "s/W"  # written out and read back
    resumed, changes = resume_config(path)
    assert resumed.training.warmup_form == "s/W" and changes == {}
    with pytest.raises(ConfigError, match=r"training\.warmup_form \('s/W' -> '\(s\+1\)/W'\)"):
        resume_config(path, ["training.warmup_form=(s+1)/W"])


@pytest.mark.parametrize("form", ["s/W", "(s+1)/W"])
def test_training_logs_the_lr_of_the_configured_form(tmp_path, form):
    from lmkit.events import StepMetrics
    from lmkit.training.loop import Trainer

    from conftest import TINY_PRESET

    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_PRESET.format(pos="rope", steps=3, eval_interval=100, ckpt_interval=100))
    config = build_run_config(str(preset), ["training.log_interval=1", "training.warmup_steps=4",
                                            "training.eval_at_start=false", f"training.warmup_form={form}"],
                              {"out_dir": ("--out-dir", str(tmp_path / "runs")), "name": ("--name", "w")})
    events = []
    Trainer(config, emit=events.append).run()
    lrs = [e.lr for e in events if isinstance(e, StepMetrics)]
    hand = {"s/W": [0.0, 0.25, 0.5], "(s+1)/W": [0.25, 0.5, 0.75]}[form]  # W = 4, steps 1..3
    assert lrs == pytest.approx([3e-3 * m for m in hand])


def test_a_run_from_before_warmup_form_resumes_with_its_s_over_w_warmup(tmp_path, tiny_preset):
    """A config.yaml and checkpoint written before the field existed: the run warmed up as
    s/W (the only form then) and must continue so, not silently switch to the new default."""
    import yaml

    from lmkit.training.checkpoint import load_checkpoint, save_checkpoint

    from conftest import run_cli

    assert run_cli("train", "--preset", str(tiny_preset), "--name", "old", "--max-steps", "3", "--set",
                   "training.warmup_form=s/W", cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "old"
    data = yaml.safe_load((run / "config.yaml").read_text())
    del data["training"]["warmup_form"]
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    latest = run / "checkpoints" / "latest.pt"
    state = load_checkpoint(latest)
    del state["config"]["training"]["warmup_form"]
    state.pop("manifest", None)
    save_checkpoint(state, latest)

    resumed = run_cli("resume", "runs/old", "--max-steps", "5", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["warmup_form"] == "s/W"
