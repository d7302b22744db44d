"""`lmkit compare baseline mul_tokens`: the multiplication-tokens study's report (SEEDS_SPEC §1.7)
on hand-written run folders whose numbers are worked out by hand below."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmkit.cli import app
from lmkit.compare import compare_runs, plot_comparison
from lmkit.compare_mul import render_mul_report

# by hand: GSM8K 4/200 vs 6/200; probes 28/281 vs 42/281; per category (correct, total)
GSM = {"baseline": (4, 200, 0), "mul_tokens": (6, 200, 30)}  # correct, total, mul tokens generated
CATS = {"baseline": {"mul_table": (8, 81, 0), "mul_multidigit": (1, 100, 0), "addition": (19, 100, 0)},
        "mul_tokens": {"mul_table": (20, 81, 12), "mul_multidigit": (3, 100, 2), "addition": (19, 100, 0)}}
STATS = {"baseline": {"total_tokens": 100_000, "train_tokens": 90_000, "val_tokens": 10_000, "mul_tokens": 0,
                      "mul_token_ratio": 0.0, "tokens_saved": 0, "token_reduction": 0.0},
         "mul_tokens": {"total_tokens": 98_000, "train_tokens": 88_200, "val_tokens": 9_800, "mul_tokens": 1_960,
                        "mul_token_ratio": 0.02, "tokens_saved": 2_000, "token_reduction": 0.02}}
SWEEP = {"baseline": [(100, 0.25), (200, 0.26)], "mul_tokens": [(100, 0.25), (200, 0.27)]}
LOSS = {"baseline": (3.10, 3.20), "mul_tokens": (3.00, 3.15)}  # final train, final val


def _config(name: str, condition: str, *, lr: float = 1e-3, init_from: str | None = None,
            source_path: Path | None = None) -> dict:
    config = {"name": name, "out_dir": "runs", "preset": "gpt2-mul-tiny", "init_from": init_from,
              "model": {"type": "gpt", "n_layer": 2, "vocab_size": 50349},
              "data": {"dataset": "corpus.txt", "tokenizer": "gpt2+mul", "condition": condition,
                       "cache_dir": f"/tmp/{name}"},
              "training": {"lr": lr, "max_steps": 200}}
    if init_from is not None:  # what the trainer records of the source (differs between the conditions)
        config["init_source"] = {"spec": init_from, "kind": "run", "path": str(source_path),
                                 "checkpoint": f"{source_path}/checkpoints/latest.pt", "checkpoint_name": "latest",
                                 "step": 200, "tokens": 200_000, "val_loss": LOSS[condition][1],
                                 "tokenizer": "gpt2+mul", "tokenizer_fingerprint": f"fp-{condition}",
                                 "run_name": Path(str(source_path)).name}
    return config


def _write_run(root: Path, name: str, role: str, *, condition: str | None = None, lr: float = 1e-3,
               init_from: str | None = None, evals: bool = True, sweep: bool = True, stats: bool = True,
               gsm_correct: int | None = None, source_path: Path | None = None) -> Path:
    import yaml

    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(_config(name, condition or role, lr=lr, init_from=init_from,
                                                            source_path=source_path)))
    train, val = LOSS[role]
    (run / "summary.json").write_text(json.dumps({"params": 1_234_567, "steps": 200, "final_train_loss": train,
                                                  "final_val_loss": val}))
    events = [{"kind": "run_started", "name": name}]
    if stats:
        events.append({"kind": "data_ready", "stats": STATS[role]})
        # a later, superseded record (an abandoned resume) is ignored
        events.append({"kind": "data_ready", "stats": {"total_tokens": 1}, "superseded": True})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if evals:
        correct, total, n_mul = GSM[role]
        correct = correct if gsm_correct is None else gsm_correct
        metrics = {"accuracy": correct / total, "correct": correct, "total": total}
        if role == "mul_tokens" or condition == "baseline":
            metrics.update(mul_token_count=n_mul, mul_tokens_per_response=n_mul / total)
        (run / "eval" / "gsm8k.json").write_text(json.dumps(
            {"task": "gsm8k", "version": "2", "metrics": metrics, "headline": "accuracy", "step": 200,
             "directions": {"accuracy": "higher", "mul_token_count": "neither"}}))
        cats = CATS[role]
        n = sum(c for c, _, _ in cats.values())
        per_cat = {c: {"correct": k, "total": t, "accuracy": k / t, "mul_tokens": m} for c, (k, t, m) in cats.items()}
        pmetrics = {"accuracy": n / 281, **{f"acc_{c}": v["accuracy"] for c, v in per_cat.items()},
                    "total_mul_tokens": sum(m for *_, m in cats.values()),
                    "mul_tokens_per_probe": sum(m for *_, m in cats.values()) / 281}
        (run / "eval" / "arithmetic-probes.json").write_text(json.dumps(
            {"task": "arithmetic-probes", "version": "1", "metrics": pmetrics, "headline": "accuracy", "step": 200,
             "details": {"extraction": "first_number", "per_category": per_cat}}))
    if sweep:
        folder = run / "eval" / "hellaswag"
        folder.mkdir()
        points = [{"step": s, "tokens": s * 1000, "metrics": {"acc": v - 0.01, "acc_norm": v}} for s, v in SWEEP[role]]
        (folder / "checkpoint_results.json").write_text(json.dumps(points))
        (folder / f"step_{SWEEP[role][-1][0]:07d}.json").write_text(json.dumps(
            {"task": "hellaswag", "headline": "acc_norm", "metrics": points[-1]["metrics"]}))
    return run


@pytest.fixture
def pair(tmp_path) -> Path:
    _write_run(tmp_path, "base", "baseline")
    _write_run(tmp_path, "mul", "mul_tokens")
    return tmp_path


def test_report_follows_the_seed_shape_with_numbers_worked_out_by_hand(pair):
    report = compare_runs(["base", "mul"], pair).to_report()
    study = report["mul_tokens_report"]
    assert study["applies_because"] == "data.condition"
    assert study["runs"] == {"baseline": "base", "mul_tokens": "mul"}
    assert study["baseline"]["gsm8k"]["accuracy"] == 0.02 and study["mul_tokens"]["arithmetic"]["accuracy"] == 42 / 281
    comp = study["comparison"]
    assert comp["gsm8k"]["baseline_accuracy"] == 0.02 and comp["gsm8k"]["mul_tokens_accuracy"] == 0.03
    assert comp["gsm8k"]["delta"] == pytest.approx(0.01)
    assert comp["gsm8k"]["relative_improvement"] == pytest.approx(0.5)
    assert comp["arithmetic"]["delta"] == pytest.approx(14 / 281)
    assert comp["arithmetic_by_category"]["mul_table"] == pytest.approx(
        {"baseline": 8 / 81, "mul_tokens": 20 / 81, "delta": 12 / 81})
    assert comp["arithmetic_by_category"]["addition"]["delta"] == 0
    assert list(comp["arithmetic_by_category"]) == ["mul_table", "mul_multidigit", "addition"]
    # the seed's usage block comes from the mul run's GSM8K metrics
    assert comp["mul_token_usage"]["total_mul_tokens"] == 30
    assert comp["mul_token_usage"]["per_response"] == pytest.approx(0.15)
    assert comp["mul_token_usage"]["by_condition"]["mul_tokens"]["probes_by_category"] == {
        "mul_table": 12, "mul_multidigit": 2, "addition": 0}
    assert study["verdict"] == "IMPROVEMENT"
    # Fisher's exact test on the counts typed in: 4/200 vs 6/200
    from scipy.stats import fisher_exact

    assert comp["gsm8k"]["p_value"] == pytest.approx(fisher_exact([[4, 196], [6, 194]]).pvalue)
    assert "Fisher's exact test" in study["verdict_basis"]
    hs = study["hellaswag"]
    assert hs["baseline"]["acc_norm"] == 0.26 and hs["mul_tokens"]["step"] == 200
    assert hs["delta"] == pytest.approx(0.01)
    data = study["data"]
    assert data["rows"]["total_tokens"] == {"baseline": 100_000, "mul_tokens": 98_000, "delta": -2_000,
                                            "relative_change": pytest.approx(-0.02)}
    assert data["rows"]["mul_token_ratio"]["mul_tokens"] == 0.02  # the superseded record is not read
    assert data["compression"]["tokens_saved"] == 2_000 and data["compression"]["reduction"] == pytest.approx(0.02)
    train = study["training"]
    assert train["num_params"] == {"baseline": 1_234_567, "mul_tokens": 1_234_567, "delta": 0}
    assert train["vocab_size"]["mul_tokens"] == 50349
    assert train["final_val_loss"]["delta"] == pytest.approx(-0.05)
    assert train["final_train_loss"]["baseline"] == 3.10


def test_the_baseline_condition_is_the_base_whatever_the_order(pair):
    study = compare_runs(["mul", "base"], pair).to_report()["mul_tokens_report"]
    assert study["runs"] == {"baseline": "base", "mul_tokens": "mul"}
    assert study["comparison"]["gsm8k"]["delta"] == pytest.approx(0.01)


def test_rendered_summary_names_the_verdict(pair, tmp_path):
    lines = render_mul_report(compare_runs(["base", "mul"], pair).mul_report())
    gsm = next(line for line in lines if "GSM8K accuracy" in line)
    assert gsm.split()[-4:] == ["2.00%", "3.00%", "+1.00%", "(+50.0%)"]
    assert any("mul_table" in line and "9.88%" in line and "24.69%" in line for line in lines)
    assert any("token compression: 2,000 fewer tokens (2.00% reduction)" in line for line in lines)
    assert lines[-2] == "RESULT: Mul-tokens condition shows IMPROVEMENT on GSM8K"
    assert "Fisher's exact test p = 0.751: within item-sampling noise" in lines[-1]
    _write_run(tmp_path / "r", "b", "baseline")
    _write_run(tmp_path / "r", "m", "mul_tokens", gsm_correct=2)
    worse = compare_runs(["b", "m"], tmp_path / "r").mul_report()
    assert worse["verdict"] == "REGRESSION"
    assert render_mul_report(worse)[-2] == "RESULT: Mul-tokens condition shows REGRESSION on GSM8K"
    _write_run(tmp_path / "s", "b", "baseline")
    _write_run(tmp_path / "s", "m", "mul_tokens", gsm_correct=4)
    assert render_mul_report(compare_runs(["b", "m"], tmp_path / "s").mul_report())[-2] == \
        "RESULT: No difference between conditions on GSM8K"


def test_report_only_for_the_studys_two_conditions(tmp_path):
    # the configs differ in more than the condition and nothing counts mul tokens: no report
    _write_run(tmp_path, "a", "baseline", evals=False)
    _write_run(tmp_path, "b", "mul_tokens", lr=3e-3, evals=False)
    assert compare_runs(["a", "b"], tmp_path).mul_report() is None
    assert "mul_tokens_report" not in compare_runs(["a", "b"], tmp_path).to_report()
    # ... unless a run counts mul tokens
    _write_run(tmp_path, "c", "mul_tokens", lr=3e-3)
    assert compare_runs(["a", "c"], tmp_path).mul_report()["applies_because"] == "mul-token counts"
    # same condition twice, nothing counted: not the study
    _write_run(tmp_path, "d", "baseline", lr=3e-3, evals=False)
    assert compare_runs(["a", "d"], tmp_path).mul_report() is None
    # three runs: the generic comparison only
    assert compare_runs(["a", "b", "c"], tmp_path).mul_report() is None


def test_fine_tuned_runs_take_hellaswag_and_data_stats_from_their_pretraining_runs(tmp_path, monkeypatch):
    _write_run(tmp_path, "base", "baseline", evals=False)
    _write_run(tmp_path, "mul", "mul_tokens", evals=False)
    _write_run(tmp_path, "base-sft", "baseline", init_from="base:latest", sweep=False, stats=False,
               source_path=tmp_path / "base")
    _write_run(tmp_path, "mul-sft", "mul_tokens", init_from=str(tmp_path / "mul"), sweep=False, stats=False,
               source_path=tmp_path / "mul")
    comparison = compare_runs(["base-sft", "mul-sft"], tmp_path)
    study = comparison.mul_report()
    assert study["applies_because"] == "data.condition"
    assert study["hellaswag"]["baseline"] == {"acc_norm": 0.26, "step": 200, "from_run": "base", "checkpoints": 2}
    assert study["hellaswag"]["mul_tokens"]["from_run"] == "mul"
    assert study["data"]["mul_tokens"]["from_run"] == "mul" and study["data"]["rows"]["val_tokens"]["delta"] == -200

    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_comparison(comparison, tmp_path / "cmp.png")
    panel = next(ax for ax in figures[0].axes if ax.get_title().startswith("hellaswag"))
    curves = {line.get_label(): list(line.get_ydata()) for line in panel.get_lines()}
    assert curves == {"base-sft (from base)": [0.25, 0.26], "mul-sft (from mul)": [0.25, 0.27]}


def test_near_zero_accuracy_p_value_is_fishers_exact_not_a_liberal_z_test(tmp_path):
    from scipy.stats import fisher_exact

    from lmkit.compare_mul import two_proportion_p

    # 0/200 vs 5/200: Fisher 0.061 (the unpooled z-test said 0.024, "beyond noise")
    assert two_proportion_p(0.0, 200, 5 / 200, 200) == pytest.approx(fisher_exact([[0, 200], [5, 195]]).pvalue)
    assert two_proportion_p(0.0, 200, 5 / 200, 200) == pytest.approx(0.0609, abs=1e-4)
    assert two_proportion_p(0.0, 200, 0.0, 200) == 1.0
    assert two_proportion_p(0.5, None, 0.5, 200) is None
    _write_run(tmp_path, "b", "baseline", gsm_correct=0)
    _write_run(tmp_path, "m", "mul_tokens", gsm_correct=5)
    lines = render_mul_report(compare_runs(["b", "m"], tmp_path).mul_report())
    assert "Fisher's exact test p = 0.0609: within item-sampling noise" in lines[-1]


def test_fine_tuned_runs_found_from_another_folder_through_the_recorded_source_path(tmp_path, monkeypatch):
    # pretraining runs in one folder, fine-tuned runs in another, init_from typed relative to the
    # folder training ran in; compare runs elsewhere, where a decoy "pre/base" has no sweep
    _write_run(tmp_path / "proj" / "pre", "base", "baseline", evals=False)
    _write_run(tmp_path / "proj" / "pre", "mul", "mul_tokens", evals=False)
    for name, role in (("base-sft", "baseline"), ("mul-sft", "mul_tokens")):
        source = name.removesuffix("-sft")
        _write_run(tmp_path / "proj" / "sft", name, role, init_from=f"pre/{source}", sweep=False, stats=False,
                   source_path=tmp_path / "proj" / "pre" / source)
    _write_run(tmp_path / "elsewhere" / "pre", "base", "baseline", evals=False, sweep=False, stats=False)
    monkeypatch.chdir(tmp_path / "elsewhere")
    study = compare_runs(["base-sft", "mul-sft"], tmp_path / "proj" / "sft").mul_report()
    assert study["applies_because"] == "data.condition"
    assert study["hellaswag"]["baseline"] == {"acc_norm": 0.26, "step": 200, "from_run": "base", "checkpoints": 2}
    assert study["hellaswag"]["mul_tokens"]["acc_norm"] == 0.27
    assert study["data"]["baseline"]["from_run"] == "base" and study["data"]["rows"]["val_tokens"]["delta"] == -200


def test_pretraining_runs_draw_both_hellaswag_curves_in_one_panel(pair, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_comparison(compare_runs(["base", "mul"], pair), pair / "cmp.png")
    panel = next(ax for ax in figures[0].axes if ax.get_title().startswith("hellaswag"))
    assert {line.get_label(): list(line.get_xdata()) for line in panel.get_lines()} == {
        "base": [100, 200], "mul": [100, 200]}
    assert "acc_norm" in panel.get_ylabel()


def test_cli_json_has_the_report_beside_the_generic_keys(pair):
    res = CliRunner().invoke(app, ["compare", "base", "mul", "--out-dir", str(pair), "--json", "--no-plot"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert {"runs", "comparison", "mul_tokens_report"} <= set(report)
    assert report["mul_tokens_report"]["comparison"]["gsm8k"]["delta"] == pytest.approx(0.01)
