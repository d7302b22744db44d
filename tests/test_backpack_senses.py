"""Reading a Backpack's senses: the training log (senses.jsonl, training_log.json), lmkit eval
--task senses, --sense-scale for sampling, and the Hugging Face export with its own modelling
code. One tiny Backpack run on real Europarl text (BPE) serves most tests."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED_DATA

BP_PRESET = """\
model: {{type: {type}, n_layer: 1, n_head: 2, n_embd: 16, {extra} block_size: 16, dropout: 0.1}}
data: {{dataset: '{text}', tokenizer: bpe, bpe_vocab_size: 300}}
training: {{batch_size: 4, max_steps: 8, lr: 3.0e-3, schedule: constant, warmup_steps: 0, log_interval: 1,
           eval_interval: 4, eval_iters: 2, checkpoint_interval: 4, seed: 7, tensorboard: false}}
{senses}"""
SENSES = "senses: {log_interval: 4, words: [Parliament, session], n_frequent: 3, top_k: 4, val_tokens: 200, min_count: 1}\n"
K = 4


def _train(root, name, model_type="backpack", senses=SENSES, extra=f"n_senses: {K},", overrides=()):
    from lmkit.config import build_run_config
    from lmkit.training.loop import Trainer

    preset = root / f"{name}.yaml"
    preset.write_text(BP_PRESET.format(type=model_type, extra=extra, text=root / "europarl.txt", senses=senses))
    config = build_run_config(str(preset), list(overrides),
                              {"out_dir": ("--out-dir", str(root / "runs")), "name": ("--name", name)})
    events = []
    trainer = Trainer(config, events.append)
    trainer.run()
    return trainer, events


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A Backpack run with the senses log, and the same run without it (losses compared)."""
    source = SHARED_DATA / "europarl-en" / "ep-00-01-17.al"
    if not source.exists():
        pytest.skip(f"shared data not found: {source}")
    root = tmp_path_factory.mktemp("senses")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMKIT_CACHE_DIR", str(root / "cache"))
        mp.setenv("HF_HOME", str(root / "hf-home"))
        (root / "europarl.txt").write_text(source.read_text(encoding="latin-1")[:20000])
        with_log, events = _train(root, "bp")
        without, _ = _train(root, "plain", senses="")
        yield {"root": root, "bp": with_log, "events": events, "plain": without}


def _records(trainer):
    return [json.loads(line) for line in (trainer.run.path / "senses.jsonl").read_text().splitlines()]


def _load(run_path):
    from lmkit.runs import load_run

    return load_run(run_path, "latest")


class _Result:
    def __init__(self, result):
        self.returncode, self.stdout, self.stderr = result.exit_code, result.stdout, result.stderr


def run_cli(*args, cwd, env):
    """``lmkit ARGS`` through Typer's runner (no new interpreter: ~3 s less per call)."""
    from typer.testing import CliRunner

    from lmkit.cli import app

    return _Result(CliRunner().invoke(app, list(args), env=env))


def _env(runs):
    return {"LMKIT_CACHE_DIR": str(runs["root"] / "cache"), "HF_HOME": str(runs["root"] / "hf-home")}


# --------------------------------------------------------------------------------------
# The training log
# --------------------------------------------------------------------------------------


def test_senses_log_is_non_empty_and_projection_matches_the_forward_pass(runs):
    trainer = runs["bp"]
    records = _records(trainer)
    assert {r["step"] for r in records} == {4, 8}
    proj = [r for r in records if r["kind"] == "projection" and r["step"] == 8]
    tok = trainer.data.tokenizer
    parliament = tok.encode(" Parliament")
    assert [r["token_id"] for r in proj if r["word"] == "Parliament" and r["sense"] == 0] == parliament
    assert len({(r["token_id"], r["sense"]) for r in proj}) == len(proj)
    loaded = _load(trainer.run.path)
    model = loaded.model
    for r in proj:
        assert len(r["items"]) == len(r["bottom_items"]) == 4
        # independent: a one-token input with only sense ℓ switched on has logits E·C(x)_ℓ (α = 1)
        onehot = torch.zeros(K)
        onehot[r["sense"]] = 1.0
        with torch.no_grad(), model.scale_senses(onehot):
            logits = model(torch.tensor([[r["token_id"]]]))[0][0, 0]
        top = logits.topk(4)
        assert [tok.decode([int(i)]) for i in top.indices] == r["items"]
        assert np.allclose(r["scores"], top.values.numpy(), atol=1e-5)
        assert np.allclose(r["bottom_scores"], (-(-logits).topk(4).values).numpy(), atol=1e-5)


def test_activation_records_match_a_naive_loop_over_alpha(runs):
    trainer = runs["bp"]
    act = [r for r in _records(trainer) if r["kind"] == "activation" and r["step"] == 8]
    assert [r["sense"] for r in act] == list(range(K))
    model = _load(trainer.run.path).model
    val = np.asarray(trainer.data.tokens("val"))[:200].astype(np.int64)
    sums, counts = {}, {}
    with torch.no_grad():
        for start in range(0, len(val) - 15, 16):  # 16-token windows, as the log cuts them
            x = torch.tensor(val[start:start + 16]).view(1, -1)
            with model.capture(alpha=True) as cap:
                model(x)
            for j in range(16):
                t = int(x[0, j])
                counts[t] = counts.get(t, 0) + 1
                for s in range(K):
                    sums[(s, t)] = sums.get((s, t), 0.0) + sum(float(cap.alpha[0, s, i, j]) for i in range(j, 16))
    for r in act:
        assert len(r["items"]) == 4 and r["reduce"] == "mean"
        means = {t: sums[(r["sense"], t)] / c for t, c in counts.items()}
        best = sorted(means.values(), reverse=True)[:4]
        assert np.allclose(r["scores"], best, atol=1e-4)
        assert [counts[t] for t in r["token_ids"]] == r["counts"]


def _metrics(trainer, split):
    rows = [json.loads(line) for line in trainer.run.metrics_path.read_text().splitlines()]
    return [r for r in rows if r.get("split") == split]


def test_training_log_follows_the_seeds_schema(runs):
    trainer = runs["bp"]
    log = json.loads((trainer.run.path / "training_log.json").read_text())
    assert set(log) == {"iterations", "train_loss", "val_loss", "learning_rate", "top_activating_words"}
    val, train = _metrics(trainer, "val"), _metrics(trainer, "train")
    assert log["iterations"] == [r["step"] for r in val]
    assert log["val_loss"] == pytest.approx([r["loss"] for r in val])
    n = len(log["iterations"])
    assert all(len(log[k]) == n for k in ("train_loss", "val_loss", "learning_rate"))
    # train_loss: the mean training loss of the steps since the previous evaluation
    for i in range(1, n):
        lo, hi = log["iterations"][i - 1], log["iterations"][i]
        steps = [r["loss"] for r in train if lo < r["step"] <= hi]
        assert log["train_loss"][i] == pytest.approx(sum(steps) / len(steps), rel=1e-6)
        assert log["learning_rate"][i] == pytest.approx([r["lr"] for r in train if r["step"] == hi][0])
    assert [e["iteration"] for e in log["top_activating_words"]] == [4, 8]
    last = log["top_activating_words"][-1]["words"]
    assert len(last) == K * 4 and all(set(w) == {"sense", "token_id", "word", "activation"} for w in last)


def test_the_log_does_not_change_training(runs):
    a, b = runs["bp"], runs["plain"]
    assert not (b.run.path / "senses.jsonl").exists()
    for split in ("train", "val"):
        assert [(r["step"], r["loss"]) for r in _metrics(a, split)] == [(r["step"], r["loss"]) for r in _metrics(b, split)]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_a_model_without_senses_refuses_the_log_in_one_line(runs):
    from lmkit.errors import ConfigError

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMKIT_CACHE_DIR", str(runs["root"] / "cache"))
        with pytest.raises(ConfigError) as err:
            _train(runs["root"], "gpt-senses", model_type="gpt", extra="")
    assert "has no senses" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------
# lmkit eval --task senses and --sense-scale
# --------------------------------------------------------------------------------------


def _direct_loss(model, batches, zero=None):
    """Mean CE with sense ``zero`` left out of o = Σ_ℓ α_ℓ C_ℓ, from the captured α and senses."""
    nats, n = 0.0, 0
    with torch.no_grad():
        for x, y, *_ in batches:
            x, y = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))
            with model.capture(alpha=True) as cap:
                model(x)
            keep = [s for s in range(K) if s != zero]
            o = sum(cap.alpha[:, s] @ cap.senses[:, s] for s in keep)
            logits = o @ model.transformer.wte.weight.T
            nats += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
            n += y.numel()
    return nats / n


def test_eval_senses_prints_tables_and_the_zeroing_matches_a_direct_computation(runs):
    from lmkit.data import prepare_data
    from lmkit.evaluation.perplexity import scored_windows

    run = runs["bp"].run.path
    res = run_cli("eval", str(run), "--task", "senses", "--word", "Parliament", "--word", "session",
                  "--sense-top-k", "3", "--checkpoint", "latest", "--json", cwd=runs["root"], env=_env(runs))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)["results"][0]
    assert out["task"] == "senses" and out["details"]["sense_top_k"] == 3
    words = out["details"]["words"]
    assert [w["word"] for w in words] == ["Parliament", "session"]
    assert all(len(s["top"]) == 3 for w in words for t in w["tokens"] for s in t["senses"])
    assert "senses of 'Parliament'" in res.stderr and "zeroing one sense" in res.stderr
    loaded = _load(run)
    data = prepare_data(loaded.config.data)
    _, batches = scored_windows(data.tokens("val"), None, 16, 32)
    batches = list(batches)
    base = _direct_loss(loaded.model, batches)
    assert out["metrics"]["base_loss"] == pytest.approx(base, abs=1e-5)
    for z in out["details"]["zeroed"]:
        assert z["delta"] == pytest.approx(_direct_loss(loaded.model, batches, zero=z["sense"]) - base, abs=1e-5)
    assert len({round(z["delta"], 6) for z in out["details"]["zeroed"]}) > 1  # the senses differ


def test_eval_senses_on_a_transformer_run_says_so_in_one_line(runs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMKIT_CACHE_DIR", str(runs["root"] / "cache"))
        gpt, _ = _train(runs["root"], "gpt", model_type="gpt", extra="", senses="",
                        overrides=["training.max_steps=1"])
    res = run_cli("eval", str(gpt.run.path), "--task", "senses", "--word", "Parliament", cwd=runs["root"],
                  env=_env(runs))
    assert res.returncode == 2
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "the model has no senses" in lines[0], res.stderr


def _greedy(model, ids, n):
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(ids):].tolist()


def test_sense_scale_changes_sampling_as_scale_senses_says(runs):
    run = runs["bp"].run.path
    loaded = _load(run)
    tok, model = loaded.tokenizer, loaded.model
    prompt = "the Parliament"
    ids = tok.encode(prompt)
    factors = torch.ones(model.config.vocab_size, K)
    for t in tok.encode(" Parliament"):
        factors[t, 2] = 40.0
    with model.scale_senses(factors):
        steered = _greedy(model, ids, 6)
    assert steered != _greedy(model, ids, 6)  # the intervention matters here
    res = run_cli("eval", str(run), "--task", "sample", "--prompt", prompt, "--temperature", "0",
                  "--max-new-tokens", "6", "--sense-scale", "Parliament:2=40", "--checkpoint", "latest", "--json",
                  cwd=runs["root"], env=_env(runs))
    assert res.returncode == 0, res.stderr
    sample = json.loads(res.stdout)["results"][0]["details"]["samples"][0]
    assert sample["text"] == tok.decode(steered)
    bad = run_cli("eval", str(run), "--task", "sample", "--sense-scale", "Parliament:9=0", cwd=runs["root"],
                  env=_env(runs))
    assert bad.returncode == 2 and "senses 0..3" in bad.stderr


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def test_hf_export_loads_with_trust_remote_code_matches_and_generates(runs):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, out = runs["bp"].run.path, runs["root"] / "hf"
    res = run_cli("export", str(run), "--to", "hf", str(out), "--checkpoint", "latest", cwd=runs["root"],
                  env=_env(runs))
    assert res.returncode == 0, res.stderr
    assert "verified" in res.stdout and "tokenizer ids equal" in res.stdout
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].startswith("modeling_")
    loaded = _load(run)
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True, local_files_only=True)
    text = "Resumption of the session of the European Parliament"
    ids = hf_tok(text)["input_ids"]
    assert ids == loaded.tokenizer.encode(text)
    gen = torch.Generator().manual_seed(3)
    for x in (torch.tensor([ids[:16]]), torch.randint(0, loaded.model.config.vocab_size, (2, 16), generator=gen)):
        with torch.no_grad():
            diff = (hf(input_ids=x).logits - loaded.model(x)[0]).abs().max()
        assert diff < 1e-4
    out_ids = hf.generate(torch.tensor([ids[:5]]), max_new_tokens=6, do_sample=False)
    assert out_ids[0, 5:].tolist() == _greedy(loaded.model, ids[:5], 6)


def test_safetensors_export_works_and_legacy_refuses_hf_in_one_line(runs):
    res = run_cli("export", str(runs["bp"].run.path), "--to", "safetensors", str(runs["root"] / "st"),
                  cwd=runs["root"], env=_env(runs))
    assert res.returncode == 0 and "bit-identical" in res.stdout, res.stderr
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMKIT_CACHE_DIR", str(runs["root"] / "cache"))
        legacy, _ = _train(runs["root"], "legacy", model_type="backpack-legacy", extra=f"n_senses: {K},", senses="",
                           overrides=["training.max_steps=1"])
    res = run_cli("export", str(legacy.run.path), "--to", "hf", str(runs["root"] / "lg"), cwd=runs["root"],
                  env=_env(runs))
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "safetensors" in lines[0], res.stderr
    assert math.isfinite(legacy.last_val.loss)


@pytest.mark.parametrize("options", [
    {"pos_encoding": "rope", "bias": False, "activation": "gelu_tanh"},
    {"norm": "rmsnorm", "norm_affine": False, "qk_norm": True, "qkv": "separate", "embed_norm": True,
     "activation": "relu2", "pos_encoding": "rope"},
    {"norm": "rmsnorm", "attn_bias": True, "mlp_bias": False, "bias": False, "d_ff": 24},
])
def test_remote_code_computes_every_backpack_option(tmp_path, options):
    pytest.importorskip("transformers")
    from lmkit.config.backpack import BackpackConfig
    from lmkit.export.backpack_hf import load_remote, write_backpack_folder
    from lmkit.models import build_model

    torch.manual_seed(0)
    config = BackpackConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=16, n_senses=4, block_size=12, **options)
    model = build_model(config).eval()
    with torch.no_grad():  # non-trivial norm gains and biases
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    write_backpack_folder(model, config, None, tmp_path)
    hf = load_remote(tmp_path).eval()
    x = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(input_ids=x).logits - model(x)[0]).abs().max() < 1e-5
        # left padding: the padded row's real tokens see what an unpadded row sees (positions from 0)
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, :3] = 0
        padded = hf(input_ids=x[:2], attention_mask=mask).logits
        assert (padded[1, 3:] - model(x[1:2, 3:])[0][0]).abs().max() < 1e-5


def test_the_log_resumes_exactly(runs):
    """Resuming a copy of the run from its step-4 checkpoint moves the later records aside and
    writes the same senses.jsonl and training_log.json as the uninterrupted run."""
    import shutil

    from lmkit.training.loop import Trainer
    from lmkit.training.resume import resume_config

    straight = runs["bp"].run.path
    copy = runs["root"] / "runs" / "bp-resumed"
    shutil.copytree(straight, copy)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMKIT_CACHE_DIR", str(runs["root"] / "cache"))
        config, changes = resume_config(copy / "config.yaml", [])
        Trainer(config, lambda e: None, resume_dir=copy, checkpoint="step_0000004", config_changes=changes).run()
    assert (copy / "senses.jsonl").read_text() == (straight / "senses.jsonl").read_text()
    assert json.loads((copy / "training_log.json").read_text()) == json.loads((straight / "training_log.json").read_text())
    assert (copy / "superseded" / "senses.jsonl").exists()


def test_the_examples_transformer_differs_from_backpack_tiny_only_in_the_senses():
    from pathlib import Path

    from lmkit.config import build_run_config
    from lmkit.models import build_model

    path = Path(__file__).resolve().parents[1] / "examples" / "backpack_vs_transformer" / "transformer-tiny.yaml"
    gpt, bp = build_run_config(str(path), [], {}), build_run_config("backpack-tiny", [], {})
    a, b = gpt.model_dump(), bp.model_dump()
    assert a["data"] == b["data"] and a["training"] == b["training"]
    assert {k for k in a["model"].keys() | b["model"].keys() if a["model"].get(k) != b["model"].get(k)} == {
        "type", "n_senses", "sense_mlp_ratio"}
    gpt.model.vocab_size = 2048
    assert build_model(gpt.model, device="meta").num_params() == gpt.target_params == 664_192
