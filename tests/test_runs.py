"""load_run / list_checkpoints: a trained run comes back exactly as it was saved."""

import pytest
import torch

from lmkit.config import build_run_config
from lmkit.errors import CheckpointError, ConfigError
from lmkit.runs import list_checkpoints, load_run
from lmkit.training.loop import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import TINY_PRESET

    root = tmp_path_factory.mktemp("runs")
    preset = root / "tiny.yaml"
    preset.write_text(TINY_PRESET.format(pos="rope", steps=20, eval_interval=10, ckpt_interval=10))
    config = build_run_config(str(preset), [], {"out_dir": ("--out-dir", str(root / "runs")),
                                                "name": ("--name", "r")})
    train(config)
    return root / "runs" / "r"


def test_load_run_rebuilds_the_saved_weights_and_tokenizer(trained):
    loaded = load_run(trained, "latest")
    state = torch.load(trained / "checkpoints" / "latest.pt", weights_only=True)
    assert loaded.step == 20 == state["step"] and loaded.tokens == state["tokens"]
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
    assert not loaded.model.training
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("12+(3*4)=")) == "12+(3*4)="
    assert loaded.val_loss == state["last_val"]["loss"]
    assert "model" not in loaded.state and "optimizer" not in loaded.state


def test_list_checkpoints_is_one_entry_per_step(trained):
    steps = [step for step, _ in list_checkpoints(trained)]
    assert steps == [10, 20]


def test_missing_run_and_checkpoint_are_clear_errors(trained, tmp_path):
    with pytest.raises(ConfigError, match="no run there"):
        load_run(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="step_0000099.*have: .*latest"):
        load_run(trained, "step_0000099")
