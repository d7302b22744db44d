"""init_from hf:DIR -- Hugging Face GPT-2 / GPT-NeoX checkpoints into lmkit's GPT, verified by logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_PRESET, shared

transformers = pytest.importorskip("transformers")

from lmkit.cli import app  # noqa: E402
from lmkit.config import build_run_config  # noqa: E402
from lmkit.errors import CheckpointError, ConfigError  # noqa: E402
from lmkit.export.hf import export_hf  # noqa: E402
from lmkit.models import hf_import  # noqa: E402
from lmkit.runs import load_run  # noqa: E402
from lmkit.training.init_from import load_init_source  # noqa: E402
from lmkit.training.loop import train  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    """The runs here train on one thread (fast on a loaded machine); give the others theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _scaled(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights large enough that a wrong mapping moves the logits far beyond 1e-4."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _hf_vs_lmkit(folder: Path, model: torch.nn.Module, vocab: int, seq: int = 24) -> float:
    """max |Δ logit| on fresh ids, the HF model loaded here independently of the importer."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                           dtype=torch.float32).eval()
    idx = torch.randint(0, vocab, (3, seq), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float((model(idx)[0] - hf(input_ids=idx).logits).abs().max())


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A GPT2LMHeadModel built with transformers (square c_proj and c_fc: shapes cannot tell a
    missing transpose), random weights, GPT-2's own tokenizer files, saved locally."""
    import shutil

    folder = tmp_path_factory.mktemp("hf-gpt2")
    files = tmp_path_factory.mktemp("gpt2-files")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(shared("gpt2-tokenizer", name), files / name)
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(files))
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=32,
                                  activation_function="gelu_new", bos_token_id=50256, eos_token_id=50256)
    _scaled(transformers.GPT2LMHeadModel(cfg)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def test_transformers_gpt2_loads_with_equal_logits_and_its_tokenizer(gpt2_dir):
    source = load_init_source(f"hf:{gpt2_dir}")
    cfg = source.model_config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.d_ff, cfg.block_size, cfg.vocab_size) == (2, 2, 32, 32, 64, 50257)
    assert cfg.activation == "gelu_tanh" and cfg.pos_encoding == "learned" and cfg.tie_embeddings
    from lmkit.models import build_model

    model = build_model(cfg)
    model.load_state_dict(source.state)
    assert _hf_vs_lmkit(gpt2_dir, model.eval(), cfg.vocab_size) < 1e-4
    assert source.record()["max_abs_diff"] < 1e-4 and source.record()["hf_class"] == "GPT2LMHeadModel"
    # the run's tokenizer is the folder's: the same ids as transformers' tokenizer
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(gpt2_dir), local_files_only=True)
    text = "Hello world, 6*9=54 isn't it?\n  Numbers: 1234567."
    assert source.tokenizer.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert source.tokenizer.eos_id == 50256 and source.tokenizer_name == f"hf:{gpt2_dir.resolve()}"


def test_a_skipped_transpose_is_refused(gpt2_dir, monkeypatch):
    """The exporter's old bug in reverse: the square attn.c_proj copied untransposed must fail verification."""
    monkeypatch.setattr(hf_import, "CONV1D_WEIGHTS", ("attn.c_attn.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
    with pytest.raises(CheckpointError, match=r"max \|Δ logit\|") as err:
        load_init_source(f"hf:{gpt2_dir}")
    assert "\n" not in str(err.value)


def _neox(folder: Path, **options) -> Path:
    cfg = transformers.GPTNeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=40, bos_token_id=0, eos_token_id=0,
                                     **options)
    _scaled(transformers.GPTNeoXForCausalLM(cfg), seed=1).save_pretrained(str(folder))
    return folder


def test_gpt_neox_sequential_full_rotary_loads_exactly(tmp_path):
    folder = _neox(tmp_path / "neox", use_parallel_residual=False, attention_bias=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0})
    imported = hf_import.import_hf_model(str(folder))
    cfg = imported.config
    assert cfg.pos_encoding == "rope" and cfg.rope_theta == 500.0 and not cfg.tie_embeddings
    assert cfg.use_attn_bias is False and cfg.use_mlp_bias is True and cfg.block_size == 40
    assert _hf_vs_lmkit(folder, imported.model, 97) < 1e-4


@pytest.mark.parametrize("options, key", [
    ({"use_parallel_residual": True}, "use_parallel_residual"),
    ({"use_parallel_residual": False,
      "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}}, "rotary_pct"),
])
def test_gpt_neox_options_lmkit_cannot_represent_are_refused_in_one_line(tmp_path, options, key):
    folder = _neox(tmp_path / "pythia-like", **options)
    with pytest.raises(ConfigError) as err:
        load_init_source(f"hf:{folder}")
    message = str(err.value)
    assert key in message and "\n" not in message and message.startswith(f"hf:{folder}")


def test_missing_folder_is_one_line():
    with pytest.raises(ConfigError, match="no such folder"):
        load_init_source("hf:./no/such/folder")


@pytest.fixture(scope="module")
def lmkit_runs(tmp_path_factory):
    """Two tiny trained lmkit runs: learned positions + tied head (-> GPT-2) and rotary + untied
    head without attention biases (-> GPT-NeoX)."""
    root = tmp_path_factory.mktemp("lmkit-runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("LMKIT_CACHE_DIR", str(root / "cache"))
    out = {}
    quick = ["training.threads=1", "training.tensorboard=false", "training.eval_at_start=false"]
    for name, pos, sets in (("learned", "learned", ["model.activation=gelu_tanh"]),
                            ("rotary", "rope", ["model.attn_bias=false", "model.tie_embeddings=false",
                                                "model.rope_theta=500"])):
        preset = root / f"{name}.yaml"
        preset.write_text(TINY_PRESET.format(pos=pos, steps=3, eval_interval=3, ckpt_interval=3))
        train(build_run_config(str(preset), sets + quick,
                               {"out_dir": ("--out-dir", str(root)), "name": ("--name", name)}))
        out[name] = root / name
    yield out
    mp.undo()


@pytest.mark.parametrize("name, hf_class", [("learned", "GPT2LMHeadModel"), ("rotary", "GPTNeoXForCausalLM")])
def test_lmkit_export_round_trips_to_equal_weights(lmkit_runs, tmp_path, name, hf_class):
    out = tmp_path / f"hf-{name}"
    export_hf(lmkit_runs[name], out, verify=False)
    source = load_init_source(f"hf:{out}")
    native = load_run(lmkit_runs[name])
    assert source.extra["hf_class"] == hf_class and source.extra["exported_from"] == str(lmkit_runs[name].resolve())
    for key in ("n_layer", "n_head", "n_embd", "ff_dim", "block_size", "vocab_size", "pos_encoding", "rope_theta",
                "activation", "tie_embeddings", "use_attn_bias", "layer_norm_eps"):
        assert getattr(source.model_config, key) == getattr(native.config.model, key), key
    ours = native.model.state_dict()
    assert set(source.state) == set(ours)
    for key, value in ours.items():
        assert torch.equal(source.state[key], value), key
    # the char tokenizer came back through tokenizer.json with the same ids
    text = "(3+4)*2=14"
    assert source.tokenizer.encode(text) == native.tokenizer.encode(text)


FT_PRESET = """\
data: {{dataset: {data}, val_fraction: 0.2}}
training: {{batch_size: 4, max_steps: 3, lr: 1.0e-3, eval_interval: 3, eval_iters: 2, checkpoint_interval: 3,
           warmup_form: "s/W", tensorboard: false}}
"""


def test_cli_trains_from_an_hf_folder_and_resumes_without_it(gpt2_dir, tmp_path):
    import shutil

    folder = tmp_path / "gpt2-copy"
    shutil.copytree(gpt2_dir, folder)
    text = shared("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:6000]
    data = tmp_path / "shakespeare.txt"
    data.write_text(text, encoding="utf-8")
    preset = tmp_path / "ft.yaml"
    preset.write_text(FT_PRESET.format(data=data))
    result = CliRunner().invoke(app, ["train", "--preset", str(preset), "--init-from", f"hf:{folder}",
                                      "--out-dir", str(tmp_path / "runs"), "--name", "ft", "--no-tui",
                                      "--threads", "1"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "ft"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["init_from"]["kind"] == "hf"
    assert summary["init_from"]["path"] == str(folder.resolve()) and summary["init_from"]["max_abs_diff"] < 1e-4
    loaded = load_run(run, "latest")
    assert loaded.config.init_from == f"hf:{folder}"
    assert (loaded.config.model.n_embd, loaded.config.model.vocab_size) == (32, 50257)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(gpt2_dir), local_files_only=True)
    sample = text[:200]
    assert loaded.tokenizer.encode(sample) == hf_tok(sample, add_special_tokens=False)["input_ids"]
    assert "init_from" in (run / "events.jsonl").read_text()
    # the fine-tune resumes itself: the HF folder is no longer needed
    shutil.rmtree(folder)
    result = CliRunner().invoke(app, ["resume", str(run), "--max-steps", "5", "--no-tui", "--threads", "1"])
    assert result.exit_code == 0, result.output
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["steps"] == 5 and resumed["init_from"] == summary["init_from"]
