"""lmkit export: HF folders proven equal to the trained model, safetensors, tokenizers, failures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_PRESET, run_cli, shared

transformers = pytest.importorskip("transformers")

from lmkit.cli import app  # noqa: E402
from lmkit.config import build_run_config  # noqa: E402
from lmkit.errors import ConfigError  # noqa: E402
from lmkit.export import hf  # noqa: E402
from lmkit.export.safetensors_export import export_safetensors, load_safetensors_export  # noqa: E402
from lmkit.export.tokenizer import save_hf_tokenizer  # noqa: E402
from lmkit.runs import load_run  # noqa: E402
from lmkit.training.loop import train  # noqa: E402

LM_PRESET = """\
model: {{n_layer: 2, n_head: 2, n_embd: 32, d_ff: 64, block_size: 32, pos_encoding: learned, dropout: 0.0}}
data: {{dataset: {data}, tokenizer: bpe, bpe_vocab_size: 300, val_fraction: 0.2}}
training: {{batch_size: 8, max_steps: 10, lr: 3.0e-3, eval_interval: 10, checkpoint_interval: 10, seed: 1}}
"""


def _train(root: Path, name: str, preset_text: str, sets: list[str]) -> Path:
    preset = root / f"{name}.yaml"
    preset.write_text(preset_text)
    train(build_run_config(str(preset), sets, {"out_dir": ("--out-dir", str(root)), "name": ("--name", name)}))
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny trained runs: ``square`` (learned positions, n_embd = d_ff = 32 so every
    projection is square, tanh GELU, tied head), ``rotary`` (pilot-like: RoPE, no attention
    biases, untied head) and ``bpe`` (learned positions on real text with a BPE tokenizer)."""
    root = tmp_path_factory.mktemp("export-runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("LMKIT_CACHE_DIR", str(root / "cache"))
    mp.setenv("HF_HOME", str(root / "hf-home"))
    mp.setenv("HF_DATASETS_CACHE", str(root / "hf-home" / "datasets"))
    def tiny(pos: str) -> str:
        return TINY_PRESET.format(pos=pos, steps=20, eval_interval=10, ckpt_interval=10)

    out = {
        "square": _train(root, "square", tiny("learned"),
                         ["model.d_ff=32", "model.activation=gelu_tanh", "model.tie_embeddings=true"]),
        "rotary": _train(root, "rotary", tiny("rope"),
                         ["model.attn_bias=false", "model.mlp_bias=true", "model.tie_embeddings=false",
                          "model.rope_theta=500"]),
    }
    text = shared("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:40_000]
    data = root / "shakespeare.txt"
    data.write_text(text, encoding="utf-8")
    out["bpe"] = _train(root, "bpe", LM_PRESET.format(data=data), [])
    out["bpe_data"] = data
    yield out
    mp.undo()


def _hf_logits(folder: Path, idx: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=idx).logits


def _random_ids(model: torch.nn.Module, rows: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, model.config.vocab_size, (rows, model.config.block_size), generator=g)


def _check_roundtrip(run: Path, out: Path) -> dict:
    """Independent of the exporter's own check: our logits vs transformers' on fresh random ids."""
    loaded = load_run(run)
    idx = _random_ids(loaded.model)
    with torch.no_grad():
        ours = loaded.model(idx)[0]
    diff = float((ours - _hf_logits(out, idx)).abs().max())
    assert diff < 1e-4, diff
    return json.loads((out / "lmkit_export.json").read_text())


def test_square_projections_roundtrip_gpt2(runs, tmp_path):
    out = tmp_path / "hf-square"
    result = hf.export_hf(runs["square"], out)
    assert result.status == "verified"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "lmkit_export.json"} <= set(result.files)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["activation_function"] == "gelu_new"
    assert config["n_inner"] == config["n_embd"] == 32 and config["layer_norm_epsilon"] == 1e-5
    meta = _check_roundtrip(runs["square"], out)
    assert meta["status"] == "verified" and meta["verification"]["passed"]
    assert max(meta["verification"]["max_abs_diff"].values()) < 1e-4
    assert set(meta["verification"]["max_abs_diff"]) == {"real", "random"}
    assert meta["verification"]["tokenizer_ids_equal"] is True
    assert meta["source"]["step"] == 20 and meta["source"]["val_loss"] is not None
    assert meta["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert meta["versions"]["transformers"] == transformers.__version__ and meta["versions"]["lmkit"]
    # Conv1D weights are (in, out): the square c_proj is stored transposed.
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    native = load_run(runs["square"]).model.state_dict()
    for name in hf.CONV1D_WEIGHTS:
        key = f"transformer.h.0.{name}"
        assert torch.equal(stored[key], native[key].t())
    for name in ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):  # square: shapes cannot tell
        assert native[f"transformer.h.0.{name}"].shape == (32, 32)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in stored)


def test_skipped_transpose_is_caught(runs, tmp_path, monkeypatch):
    """Seed 004's bug: the square attn.c_proj copied without a transpose. Verification must fail."""
    monkeypatch.setattr(hf, "CONV1D_WEIGHTS", ("attn.c_attn.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
    out = tmp_path / "hf-bad"
    result = CliRunner().invoke(app, ["export", str(runs["square"]), str(out), "--to", "hf"])
    assert result.exit_code == 1, result.output
    assert "FAILED verification" in result.stderr and "max |Δ logit|" in result.stderr
    assert (out / "EXPORT_FAILED").is_file() and not (out / "model.safetensors").exists()
    meta = json.loads((out / "lmkit_export.json").read_text())
    assert meta["status"] == "failed" and not meta["verification"]["passed"]
    assert meta["verification"]["max_abs_diff"]["random"] > 1e-2
    with pytest.raises(Exception):  # noqa: B017 - the folder must not load as a model
        transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)


def test_rotary_roundtrip_gpt_neox(runs, tmp_path):
    out = tmp_path / "hf-rotary"
    assert hf.export_hf(runs["rotary"], out).status == "verified"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and config["use_parallel_residual"] is False
    assert config["rope_parameters"]["partial_rotary_factor"] == 1.0 and config["rotary_pct"] == 1.0
    assert config["rope_parameters"]["rope_theta"] == 500 and config["attention_bias"] is False
    assert config["hidden_act"] == "gelu" and config["tie_word_embeddings"] is False
    _check_roundtrip(runs["rotary"], out)


def test_tied_and_untied_heads(runs, tmp_path):
    tied, untied = tmp_path / "tied", tmp_path / "untied"
    hf.export_hf(runs["square"], tied)
    hf.export_hf(runs["rotary"], untied)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tied), local_files_only=True)
    assert json.loads((tied / "config.json").read_text())["tie_word_embeddings"] is True
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    m2 = transformers.AutoModelForCausalLM.from_pretrained(str(untied), local_files_only=True)
    native = load_run(runs["rotary"]).model
    assert torch.equal(m2.lm_head.weight, native.lm_head.weight)
    assert not torch.equal(m2.lm_head.weight, m2.gpt_neox.embed_in.weight)


@pytest.mark.parametrize("kind", ["char", "byte", "bpe", "gpt2"])
def test_tokenizer_ids_equal(kind, tmp_path):
    from lmkit.data.tokenizers import ByteTokenizer, CharTokenizer, GPT2Tokenizer, HFTokenizer

    text = shared("wikitext-2-raw", "wiki.test.raw").read_text(encoding="utf-8")[:30_000]
    train_text, val_text = text[:20_000], text[20_000:]
    tok = {"char": lambda: CharTokenizer.from_texts([train_text]), "byte": ByteTokenizer,
           "bpe": lambda: HFTokenizer.train_bpe([train_text], 400),
           "gpt2": lambda: GPT2Tokenizer.from_files(shared("gpt2-tokenizer"))}[kind]()
    save_hf_tokenizer(tok, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    ids = tok.encode(val_text)
    assert hf_tok(val_text, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok.eos_token_id == tok.eos_id
    if kind == "char":
        assert 3 in ids  # characters unseen in training map to <UNK> on both sides
    assert hf_tok.decode(ids[:200], skip_special_tokens=True) == tok.decode(ids[:200])


def test_gpt2_tokenizer_without_standard_files(tmp_path, monkeypatch):
    """Derived from the run's own tiktoken ranks when no vocab.json/merges.txt is at hand."""
    from lmkit.data.tokenizers import GPT2Tokenizer

    tok = GPT2Tokenizer.from_files(shared("gpt2-tokenizer"))
    monkeypatch.delenv("LMKIT_GPT2_DIR", raising=False)
    info = save_hf_tokenizer(tok, tmp_path)
    assert info["origin"] == "derived from the run's tiktoken ranks"
    text = shared("wikitext-2-raw", "wiki.test.raw").read_text(encoding="utf-8")[:20_000]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def _lmkit_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    try:
        from lmkit.evaluation.generate import generate
    except ImportError:  # pragma: no cover - before the generate module existed
        idx = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(n):
                idx = torch.cat([idx, model(idx, last_only=True)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx[0, len(prompt):].tolist()
    return generate(model, [prompt], max_new_tokens=n, eos_id=None)[0]


@pytest.mark.parametrize("name", ["square", "rotary"])
def test_hf_greedy_generation_equals_lmkit(runs, tmp_path, name):
    out = tmp_path / name
    hf.export_hf(runs[name], out, verify=False)
    loaded = load_run(runs[name])
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    prompt = [loaded.tokenizer.bos_id, *loaded.tokenizer.encode("12+(3*4")]
    assert tok("12+(3*4", add_special_tokens=False)["input_ids"] == prompt[1:]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    # eos_token_id=None: run all 20 steps on both sides (a generation_config with None would
    # fall back to the folder's eos and stop early).
    theirs = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
    ours = _lmkit_greedy(loaded.model, prompt, 20)
    assert len(ours) == 20 and theirs == ours


def test_bpe_text_run_exports_with_real_validation_ids(runs, tmp_path):
    out = tmp_path / "hf-bpe"
    meta = hf.export_hf(runs["bpe"], out).metadata
    assert "split" in meta["verification"]["sample_source"]
    assert meta["verification"]["tokenizer_chars"] >= 1000
    assert meta["tokenizer"]["kind"] == "bpe"
    _check_roundtrip(runs["bpe"], out)


def test_unverifiable_export_is_marked_failed(runs, tmp_path):
    """The run's validation text is gone: nothing can be checked, so the export is failed."""
    data: Path = runs["bpe_data"]
    moved = data.with_suffix(".away")
    data.rename(moved)
    try:
        out = tmp_path / "hf-unverifiable"
        result = CliRunner().invoke(app, ["export", str(runs["bpe"]), str(out), "--to", "hf"])
        assert result.exit_code == 1
        assert "--sample-text" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert (out / "EXPORT_FAILED").is_file()
        assert json.loads((out / "lmkit_export.json").read_text())["status"] == "failed"
        sample = tmp_path / "sample.txt"
        sample.write_text(moved.read_text(encoding="utf-8")[-3000:], encoding="utf-8")
        ok = CliRunner().invoke(app, ["export", str(runs["bpe"]), str(out), "--to", "hf", "--force",
                                      "--sample-text", str(sample)])
        assert ok.exit_code == 0, ok.output
        assert not (out / "EXPORT_FAILED").exists() and (out / "model.safetensors").is_file()
    finally:
        moved.rename(data)


def test_out_folder_rules_and_no_verify(runs, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    refused = CliRunner().invoke(app, ["export", str(runs["square"]), str(out), "--to", "hf"])
    assert refused.exit_code == 2 and "--force" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and (out / "keep.txt").is_file()
    done = CliRunner().invoke(app, ["export", str(runs["square"]), str(out), "--to", "hf", "--force", "--no-verify"])
    assert done.exit_code == 0, done.output
    assert "UNVERIFIED" in done.stdout and not (out / "keep.txt").exists()
    assert json.loads((out / "lmkit_export.json").read_text())["status"] == "unverified"
    assert not list(tmp_path.glob(".taken.*"))  # no temp folders left behind


def test_bf16_export_verifies_mapping_and_reports_rounding(runs, tmp_path):
    meta = hf.export_hf(runs["rotary"], tmp_path / "bf16", dtype="bfloat16").metadata
    check = meta["verification"]
    assert check["passed"] and max(check["max_abs_diff"].values()) < 1e-4
    assert check["rounding_max_abs_diff"] > 0  # bf16 weights change the logits; reported, not judged
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("gpt_neox.embed_in.weight").dtype == torch.bfloat16


def test_safetensors_roundtrip(runs, tmp_path):
    out = tmp_path / "st"
    result = export_safetensors(runs["square"], out)
    assert result.status == "verified"
    assert {"model.safetensors", "config.yaml", "tokenizer", "lmkit_export.json"} <= set(result.files)
    model, _ = load_safetensors_export(out)
    loaded = load_run(runs["square"])
    idx = _random_ids(loaded.model)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded.model(idx)[0])
    from safetensors.torch import load_file

    keys = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)


def test_compile_and_ddp_prefixes_never_reach_an_export(runs):
    loaded = load_run(runs["square"])
    state = loaded.model.state_dict()
    clean = hf.to_gpt2_state_dict(state, loaded.config.model)
    prefixed = hf.to_gpt2_state_dict({f"module._orig_mod.{k}": v for k, v in state.items()}, loaded.config.model)
    assert clean.keys() == prefixed.keys()
    assert all(torch.equal(clean[k], prefixed[k]) for k in clean)


def test_unrepresentable_model_is_refused():
    from lmkit.config import ModelConfig

    odd = ModelConfig.model_construct(**{**ModelConfig().model_dump(), "pos_encoding": "alibi"})
    with pytest.raises(ConfigError, match="pos_encoding 'alibi' has no exact Hugging Face equivalent"):
        hf.hf_architecture(odd)


def test_missing_transformers_gives_install_hint(runs, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['transformers'] = None\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    result = run_cli("export", str(runs["square"]), str(tmp_path / "x"), "--to", "hf", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == 'error: lmkit export --to hf needs transformers: pip install "lmkit[hf]"'
    assert not (tmp_path / "x").exists()


def test_cli_exports_a_pilot_run(tmp_path):
    """The README quickstart run (the default pilot preset, RoPE) exported by the real CLI.
    Trained in-process with what `lmkit train --max-steps 5` runs, to keep the test fast."""
    from lmkit.cli.train import length_flags

    train(build_run_config("pilot", [], {**length_flags(5, None),
                                         "out_dir": ("--out-dir", str(tmp_path / "runs")),
                                         "name": ("--name", "pilot")}))
    result = run_cli("export", "runs/pilot", "hf/pilot", "--to", "hf", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "GPTNeoXForCausalLM" in result.stdout and "verified: max |Δ logit|" in result.stdout
    meta = json.loads((tmp_path / "hf" / "pilot" / "lmkit_export.json").read_text())
    assert meta["source"]["preset"] == "pilot" and meta["status"] == "verified"
    assert meta["verification"]["tokenizer_texts"] >= 100
