"""Config loading: aliases, overrides, and one-line errors naming key and source."""

import pytest

from lmkit.config import (
    ModelConfig,
    RunConfig,
    build_run_config,
    load_run_config,
    parse_override,
)
from lmkit.errors import ConfigError


def test_seed_spellings_load_and_are_written_back_canonically(tmp_path):
    path = tmp_path / "seed000.yaml"
    path.write_text(
        "model:\n  d_model: 128\n  num_heads: 4\n  num_layers: 4\n  d_ff: 384\n  max_seq_len: 32\n"
        "  use_rope: true\n  tie_weights: true\n"
        "training:\n  max_steps: 10\n"
    )
    config = build_run_config(str(path))
    assert (config.model.n_embd, config.model.n_head, config.model.n_layer) == (128, 4, 4)
    assert config.model.block_size == 32 and config.model.pos_encoding == "rope"
    text = config.to_yaml()
    assert "n_embd: 128" in text and "d_model" not in text and "max_seq_len" not in text


def test_depth_alias_and_override_alias():
    config = build_run_config("pilot", ["model.depth=6", "model.d_model=192"])
    assert config.model.n_layer == 6 and config.model.n_embd == 192


def test_both_spellings_is_an_error(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("model:\n  d_model: 64\n  n_embd: 64\ntraining:\n  max_steps: 1\n")
    with pytest.raises(ConfigError, match="both set"):
        build_run_config(str(path))


def test_override_values_are_parsed():
    assert parse_override("training.lr=3e-4") == (["training", "lr"], 3e-4)
    assert parse_override("training.betas=[0.9, 0.99]") == (["training", "betas"], [0.9, 0.99])
    assert parse_override("training.compile=true") == (["training", "compile"], True)
    assert parse_override("training.grad_clip=null") == (["training", "grad_clip"], None)
    config = build_run_config("pilot", ["training.lr=3e-4", "training.betas=[0.9, 0.99]"])
    assert config.training.lr == pytest.approx(3e-4) and config.training.betas == (0.9, 0.99)


@pytest.mark.parametrize("text", ["training.lr", "=3", "training..lr=1"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override(text)


def _error(preset="pilot", overrides=(), flags=None) -> str:
    with pytest.raises(ConfigError) as info:
        build_run_config(preset, overrides, flags)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_key_source_and_suggestion():
    message = _error(overrides=["training.lrr=1e-3"])
    assert message.startswith("--set training.lrr=1e-3: training.lrr: unknown key")
    assert "did you mean training.lr?" in message


def test_unknown_section_from_an_override_names_the_override_not_the_preset():
    message = _error(overrides=["trainin.lr=1e-3"])
    assert message.startswith("--set trainin.lr=1e-3: trainin: unknown key (did you mean training?)")


def test_unknown_key_in_preset_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_embd: 64\n  colour: blue\ntraining:\n  max_steps: 1\n")
    message = _error(str(path))
    assert "bad.yaml" in message and "model.colour: unknown key" in message


def test_n_embd_not_divisible_by_n_head():
    message = _error(overrides=["model.n_head=3"])
    assert message.startswith("--set model.n_head=3: model: n_embd (128) must be divisible by n_head (3)")


def test_section_check_in_a_preset_file_names_the_file(tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text("model:\n  n_embd: 100\n  n_head: 3\ntraining:\n  max_steps: 1\n")
    assert _error(str(path)).endswith("odd.yaml: model: n_embd (100) must be divisible by n_head (3); try n_head=4")


def test_negative_lr_names_the_flag():
    message = _error(flags={"training.lr": ("--lr", -1.0)})
    assert message.startswith("--lr: training.lr: must be greater than 0")


def test_unknown_preset_lists_available():
    message = _error(preset="smal")
    assert "unknown preset" in message and "did you mean 'small'" in message and "pilot" in message


def test_missing_preset_path():
    assert "no such file" in _error(preset="nope/missing.yaml")


def test_yaml_syntax_error_gives_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  n_embd: [1, 2\n")
    assert "broken.yaml: line" in _error(str(path))


def test_unknown_tokenizer_and_arithmetic_needs_char():
    assert "unknown tokenizer 'sentencepiece'" in _error(overrides=["data.tokenizer=sentencepiece"])
    assert "arithmetic task uses the 'char' tokenizer" in _error(overrides=["data.tokenizer=gpt2"])


def test_setting_one_length_replaces_the_other():
    config = build_run_config("pilot", ["training.max_steps=5"])  # pilot is epoch-based
    assert (config.training.max_steps, config.training.epochs) == (5, None)
    config = build_run_config("tiny", [], {"training.epochs": ("--epochs", 2)})
    assert (config.training.max_steps, config.training.epochs) == (None, 2)
    assert "either max_steps or epochs" in _error(overrides=["training.max_steps=5", "training.epochs=2"])


def test_both_lengths_in_one_file_is_an_error(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("training:\n  max_steps: 5\n  epochs: 2\n")
    assert "both.yaml: training: set either max_steps or epochs" in _error(str(path))


def test_section_check_blames_only_overrides_it_reads(tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text("model:\n  n_embd: 100\n  n_head: 3\ntraining:\n  max_steps: 1\n")
    message = _error(str(path), ["model.dropout=0.2"])
    assert message.startswith(str(path)) or "odd.yaml: model: n_embd (100)" in message
    assert "--set model.dropout" not in message


def test_alias_conflict_names_both_spellings(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("model:\n  d_model: 64\n  n_embd: 64\ntraining:\n  max_steps: 1\n")
    assert "'d_model' and 'n_embd' both set 'n_embd'" in _error(str(path))


def test_non_utf8_preset_is_a_config_error(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes("description: caf\xe9\ntraining:\n  max_steps: 1\n".encode("latin-1"))
    assert "not UTF-8 text" in _error(str(path))


def test_preset_folder_is_refused(tmp_path):
    assert "is a folder" in _error(str(tmp_path))


def test_rope_needs_even_head_dim():
    with pytest.raises(ValueError, match="even head size"):
        ModelConfig(n_embd=30, n_head=2, pos_encoding="rope")


def test_invalid_run_name():
    assert "run name" in _error(flags={"name": ("--name", "../escape")})


def test_config_yaml_round_trip(tmp_path):
    config = build_run_config("tiny", ["training.lr=1e-3"])
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert load_run_config(path) == config
    assert isinstance(load_run_config(path), RunConfig)


# --------------------------------------------------------------------------------------
# Model families: a discriminated union on model.type
# --------------------------------------------------------------------------------------


@pytest.fixture
def toy_family():
    """A second family with a key GPT lacks (as Backpack's n_senses), registered for one test."""
    from typing import Literal

    from pydantic import Field

    from lmkit.config import (
        MODEL_CONFIGS,
        MODEL_FAMILIES,
        GPTConfig,
        register_model_family,
        unregister_model_family,
    )

    class ToyConfig(GPTConfig):
        type: Literal["toy"] = "toy"
        n_senses: int = Field(16, gt=0)

    register_model_family("toy", "lmkit.models.gpt:GPT", ToyConfig)
    try:
        yield ToyConfig
    finally:
        unregister_model_family("toy")
    assert "toy" not in MODEL_FAMILIES and "toy" not in MODEL_CONFIGS


def test_a_family_key_is_accepted_by_its_family_only(toy_family, tmp_path):
    config = build_run_config("pilot", ["model.type=toy", "model.n_senses=4"])
    assert isinstance(config.model, toy_family) and config.model.n_senses == 4
    assert config.model.n_layer == 4  # the preset's other keys still apply
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert load_run_config(path) == config and isinstance(load_run_config(path).model, toy_family)
    # the same key on a GPT is an unknown key, blamed on the override, one line
    message = _error(overrides=["model.n_senses=4"])
    assert message.startswith("--set model.n_senses=4: model.n_senses: unknown key")
    # the family's own checks name the key without the union's tag
    message = _error(overrides=["model.type=toy", "model.n_senses=0"])
    assert message.startswith("--set model.n_senses=0: model.n_senses: must be greater than 0")
    assert "toy" not in message.split(":")[1]


def test_a_misspelt_family_key_gets_a_suggestion_from_that_family(toy_family):
    message = _error(overrides=["model.type=toy", "model.n_sense=4"])
    assert "model.n_sense: unknown key (did you mean model.n_senses?)" in message


def test_unknown_model_type_names_the_key_and_the_families(tmp_path):
    message = _error(overrides=["model.type=lstm"])
    assert message == "--set model.type=lstm: model.type: unknown model type 'lstm' (known: gpt, backpack, backpack-legacy)"
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  type: lstm\ntraining:\n  max_steps: 1\n")
    assert _error(str(path)).endswith("bad.yaml: model.type: unknown model type 'lstm' (known: gpt, backpack, backpack-legacy)")
    path.write_text("model: 5\ntraining:\n  max_steps: 1\n")
    assert "bad.yaml: model.type: expected a mapping of model keys" in _error(str(path))


def test_model_section_without_type_is_gpt():
    from lmkit.config import GPTConfig

    config = RunConfig.model_validate({"model": {"n_layer": 2}, "training": {"max_steps": 1}})
    assert type(config.model) is GPTConfig is ModelConfig and config.model.type == "gpt"
    assert type(RunConfig.model_validate({"training": {"max_steps": 1}}).model) is GPTConfig


def test_register_model_family_checks_the_config_class():
    from pydantic import Field

    from lmkit.config import GPTConfig, ModelConfigBase, register_model_family

    class NoLiteral(GPTConfig):
        pass

    with pytest.raises(ValueError, match="must be Literal"):
        register_model_family("nolit", "x:Y", NoLiteral)

    class NoSizes(ModelConfigBase):
        type: str = "nosizes"
        width: int = Field(1)

    with pytest.raises(ValueError, match="block_size, vocab_size"):
        register_model_family("nosizes", "x:Y", NoSizes)
