"""lmkit compare on real runs: tiny models trained here, evaluated through the eval task
contract (the real perplexity and arithmetic tasks), plus seed-004-format probe results and
a HellaSwag sweep written in the contract's file layout."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest

from lmkit.compare import compare_runs
from lmkit.errors import ConfigError

from conftest import TINY_PRESET, run_cli, shared

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# seed 004's probe categories (SEEDS_SPEC 1.3): correct out of total, per run
PROBES = {
    "base": {"mul_table": (8, 81), "mul_multidigit": (1, 100), "addition": (19, 100)},
    "other": {"mul_table": (20, 81), "mul_multidigit": (0, 100), "addition": (25, 100)},
}
SWEEP = {"base": [0.25, 0.26, 0.27, 0.28], "other": [0.25, 0.25, 0.26, 0.30]}


def _evaluate(run_dir: Path, task: str) -> dict:
    """Run a real eval task through the contract and write eval/TASK.json as `lmkit eval` does."""
    import torch

    from lmkit.evaluation.task import EvalContext, get_task
    from lmkit.runs import load_run

    loaded = load_run(run_dir, "best")
    ctx = EvalContext(model=loaded.model, tokenizer=loaded.tokenizer, config=loaded.config, run_dir=run_dir,
                      device=torch.device("cpu"), step=loaded.step, batch_size=16)
    start = time.time()
    result = get_task(task)(ctx)
    record = {**result.to_dict(), "checkpoint": "best", "step": loaded.step, "tokens": loaded.tokens,
              "wall_time_s": time.time() - start}
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / f"{task}.json").write_text(json.dumps(record, indent=2))
    return record


def _write_probes(run_dir: Path, name: str) -> None:
    cats = PROBES[name]
    correct = sum(c for c, _ in cats.values())
    metrics = {"accuracy": correct / 281, "correct": correct, "total": 281}
    details = {"categories": {cat: {"correct": c, "total": n, "accuracy": c / n} for cat, (c, n) in cats.items()}}
    if name == "other":  # a mul_tokens-like run: only it counts mul tokens
        metrics.update({"total_mul_tokens": 40, "mul_tokens_per_probe": 40 / 281})
    record = {"task": "arithmetic-probes", "version": "1", "metrics": metrics, "headline": "accuracy",
              "n_items": 281, "data_file": None, "data_sha256": None, "details": details, "notes": [],
              "checkpoint": "best", "step": 40, "tokens": 11000, "wall_time_s": 1.0}
    (run_dir / "eval" / "arithmetic-probes.json").write_text(json.dumps(record))


def _write_sweep(run_dir: Path, name: str, with_latest: bool) -> None:
    folder = run_dir / "eval" / "hellaswag"
    folder.mkdir(parents=True, exist_ok=True)
    points = [{"step": s, "tokens": s * 280, "metrics": {"acc": v - 0.01, "acc_norm": v}}
              for s, v in zip((10, 20, 30, 40), SWEEP[name], strict=True)]
    (folder / "checkpoint_results.json").write_text(json.dumps(points))
    if with_latest:
        record = {"task": "hellaswag", "version": "1", "metrics": points[-1]["metrics"], "headline": "acc_norm",
                  "n_items": 100, "data_file": "hellaswag_val.jsonl", "data_sha256": "ab", "details": {},
                  "notes": [], "checkpoint": "step_0000040", "step": 40, "tokens": 11200, "wall_time_s": 2.0}
        (run_dir / "eval" / "hellaswag.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """runs/{base, other}: tiny arithmetic runs (char tokenizer, seeds 1 and 2) with real
    perplexity + arithmetic results, probe results and a HellaSwag sweep; runs/bytes: a tiny
    byte-tokenizer run on Shakespeare with a real perplexity result; runs/empty: a config only."""
    from lmkit.config import build_run_config
    from lmkit.training.loop import train

    root = tmp_path_factory.mktemp("compare")
    preset = root / "tiny.yaml"
    preset.write_text(TINY_PRESET.format(pos="rope", steps=40, eval_interval=20, ckpt_interval=10))
    text = root / "shakespeare.txt"
    text.write_text(shared("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    runs = root / "runs"
    for name, extra in (("base", {}), ("other", {"training.seed": ("--seed", 2)}),
                        ("bytes", {"data.dataset": ("--data", str(text)), "data.tokenizer": ("--tokenizer", "byte")})):
        flags = {"out_dir": ("--out-dir", str(runs)), "name": ("--name", name), **extra}
        train(build_run_config(str(preset), [], flags))
    for name in ("base", "other"):
        _evaluate(runs / name, "perplexity")
        _evaluate(runs / name, "arithmetic")
        _write_probes(runs / name, name)
        _write_sweep(runs / name, name, with_latest=name == "base")
    _evaluate(runs / "bytes", "perplexity")
    (runs / "empty").mkdir()
    (runs / "empty" / "config.yaml").write_text((runs / "base" / "config.yaml").read_text())
    return root


@pytest.fixture(scope="module")
def cli_base_other(root):
    """`lmkit compare base other` through the real CLI, with the PNG and JSON report written."""
    png, report = root / "fig" / "base_other.png", root / "report.json"
    proc = run_cli("compare", "base", "other", "--out", str(png), "--json-out", str(report), cwd=root)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, png, json.loads(report.read_text())


def _read(root: Path, name: str, *parts: str) -> dict:
    return json.loads((root / "runs" / name).joinpath(*parts).read_text())


def _line(stdout: str, label: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith(f"│ {label} ")]
    assert len(lines) == 1, (label, stdout)
    return lines[0]


def _assert_png(path: Path) -> tuple[int, int]:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_table_shows_each_run_and_the_delta_against_the_first(root, cli_base_other):
    stdout, png, _ = cli_base_other
    base, other = _read(root, "base", "summary.json"), _read(root, "other", "summary.json")
    line = _line(stdout, "val loss (final)")
    delta = other["final_val_loss"] - base["final_val_loss"]
    assert f"{base['final_val_loss']:.4f}" in line and f"{other['final_val_loss']:.4f}" in line
    shown_delta, shown_pct = re.search(r"([+-][0-9.e-]+) \(([+-][0-9.]+)%\) │$", line).groups()
    assert float(shown_delta) == pytest.approx(delta, rel=1e-2, abs=5e-5)
    assert float(shown_pct) == pytest.approx(delta / base["final_val_loss"] * 100, abs=0.05)
    assert f"{base['params']:,}" in _line(stdout, "params")
    for label in ("steps", "tokens seen", "wall time", "train tokens/s", "wall tokens/s", "train loss (final)",
                  "train loss (best logged)",
                  "val loss (best)", "val perplexity (final)", "bpb (headline)", "acc_norm (headline)",
                  "acc_val (headline)", "accuracy (headline)", "  mul_table", "  addition"):
        _line(stdout, label)
    ppl = math.exp(base["final_val_loss"])
    assert f"{ppl:.4f}" in _line(stdout, "val perplexity (final)")
    bpb = [_read(root, n, "eval", "perplexity.json")["metrics"]["bpb"] for n in ("base", "other")]
    assert f"{bpb[0]:.4f}" in _line(stdout, "bpb (headline)") and f"{bpb[1]:.4f}" in _line(stdout, "bpb (headline)")
    # real arithmetic result: the per-split accuracies are metric rows, not repeated as categories
    assert "acc_flat" in stdout and "acc_paren" in stdout and "│   test_flat " not in stdout
    assert "different tokenizers" not in stdout and "⚠" not in stdout
    assert f"plot: {png}" in stdout


def test_json_comparison_block_follows_seed_004(root, cli_base_other):
    _, png, report = cli_base_other
    comp = report["comparison"]
    assert report["base"] == comp["base"] == "base" and list(report["runs"]) == ["base", "other"]
    assert report["png"] == str(png)

    acc = {n: sum(c for c, _ in PROBES[n].values()) / 281 for n in PROBES}
    probes = comp["arithmetic-probes"]
    assert probes["metric"] == "accuracy"
    assert probes["base_accuracy"] == pytest.approx(acc["base"]) and probes["other_accuracy"] == pytest.approx(acc["other"])
    delta = acc["other"] - acc["base"]
    assert probes["delta"]["other"] == pytest.approx(delta)
    assert probes["relative_improvement"]["other"] == pytest.approx(delta / acc["base"])
    assert probes["better"] is None and probes["better_basis"].startswith("no noise estimate")  # one run per side
    cats = comp["arithmetic-probes_by_category"]
    assert set(cats) == {"mul_table", "mul_multidigit", "addition"}
    for cat, entry in cats.items():
        b, o = (PROBES[n][cat][0] / PROBES[n][cat][1] for n in ("base", "other"))
        assert entry["base"] == pytest.approx(b) and entry["other"] == pytest.approx(o)
        assert entry["delta"]["other"] == pytest.approx(o - b)
    assert cats["mul_multidigit"]["relative_improvement"]["other"] == pytest.approx(-1.0)
    # only the run that counts mul tokens reports their usage
    assert comp["mul_token_usage"] == {"other": {"source": "arithmetic-probes", "total_mul_tokens": 40,
                                                 "per_response": pytest.approx(40 / 281)}}

    # lower is better: relative improvement is the negated relative change
    s = {n: _read(root, n, "summary.json") for n in ("base", "other")}
    val = comp["training"]["final_val_loss"]
    d = s["other"]["final_val_loss"] - s["base"]["final_val_loss"]
    assert val["values"] == {n: pytest.approx(s[n]["final_val_loss"]) for n in s}
    assert val["delta"]["other"] == pytest.approx(d)
    assert val["relative_improvement"]["other"] == pytest.approx(-d / s["base"]["final_val_loss"])
    assert val["better"] is None  # two seeds, one run each: no noise estimate
    assert comp["training"]["params"]["values"] == {"base": s["base"]["params"], "other": s["other"]["params"]}

    ppl = {n: _read(root, n, "eval", "perplexity.json")["metrics"] for n in ("base", "other")}
    assert comp["perplexity"]["metric"] == "bpb"
    assert comp["perplexity"]["delta"]["other"] == pytest.approx(ppl["other"]["bpb"] - ppl["base"]["bpb"])
    assert comp["perplexity"]["step"] == {"base": 40, "other": 40}
    # the real arithmetic task's splits become seed-style per-category numbers (correct / n)
    arith = _read(root, "base", "eval", "arithmetic.json")
    split = arith["details"]["splits"]["test_paren"]
    assert comp["arithmetic_by_category"]["test_paren"]["base"] == pytest.approx(split["correct"] / split["n"])
    # a sweep without eval/hellaswag.json contributes its last checkpoint
    hs = comp["hellaswag"]
    assert hs["metric"] == "acc_norm" and hs["values"] == {"base": SWEEP["base"][-1], "other": SWEEP["other"][-1]}
    assert report["runs"]["other"]["evals"]["hellaswag"]["from_sweep"] is True
    assert [p["step"] for p in report["runs"]["base"]["sweeps"]["hellaswag"]] == [10, 20, 30, 40]


def test_better_value_follows_the_metric_direction(root):
    from lmkit.cli.compare import BEST_STYLE, build_table

    comp = compare_runs(["base", "other"], root / "runs")
    probes = comp.row("arithmetic-probes.accuracy")  # higher is better: other
    assert probes.lower_is_better is False and probes.best_index == 1
    multidigit = comp.row("arithmetic-probes.by_category.mul_multidigit")  # base 1/100 > other 0/100
    assert multidigit.best_index == 0
    assert comp.row("perplexity.bpb").lower_is_better is True  # which run wins: see the hand-written runs below
    assert comp.row("wall_time_s").lower_is_better is True and comp.row("train_tok_per_s").lower_is_better is False
    assert comp.row("wall_tok_per_s").lower_is_better is False
    for key in ("params", "steps", "tokens", "arithmetic.paren_gap", "perplexity.step"):
        assert comp.row(key).best_index is None, key
    assert comp.row("hellaswag.acc_norm").best_index == 1  # 0.30 > 0.28 at the last checkpoint

    from lmkit.compare_groups import Verdict

    assert "*" not in "".join(str(c) for col in build_table(comp).columns for c in col._cells)  # no noise estimate
    table = build_table(comp, {row.key: Verdict(row.best_index, None, "given") for row in comp.rows})
    labels = [str(c) for c in table.columns[0]._cells]
    r = labels.index("accuracy (headline)")
    base_cell, other_cell = table.columns[1]._cells[r], table.columns[2]._cells[r]
    assert other_cell.style == BEST_STYLE and str(other_cell).endswith(" *")
    assert base_cell.style == "" and not str(base_cell).endswith("*")
    r = labels.index("  mul_multidigit")
    assert table.columns[1]._cells[r].style == BEST_STYLE
    assert table.columns[3]._cells[r].style == "red"  # other's delta is a regression
    r = labels.index("accuracy (headline)")
    assert table.columns[3]._cells[r].style == "green"


def test_different_tokenizers_warn_on_loss_rows_and_keep_bpb(root):
    proc = run_cli("compare", "base", "bytes", "--no-plot", cwd=root)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "different tokenizers (base: char/35, bytes: byte/257)" in out
    assert "compare bpb (bits per byte) instead" in out
    for label in ("train loss (final) ⚠", "val loss (final) ⚠", "val perplexity (best) ⚠", "mean_loss ⚠",
                  "perplexity ⚠"):
        _line(out, label)
    assert "⚠" not in _line(out, "bpb (headline)")
    assert "char/35" in _line(out, "tokenizer") and "byte/257" in _line(out, "tokenizer")

    comp = compare_runs(["base", "bytes"], root / "runs")
    assert comp.tokenizers_differ
    for key in ("final_val_loss", "best_val_ppl", "perplexity.mean_loss", "perplexity.perplexity"):
        row = comp.row(key)
        assert row.tokenizer_dependent and row.best_index is None, key
    bpb = comp.row("perplexity.bpb")
    assert not bpb.tokenizer_dependent and bpb.best_index is not None
    assert not compare_runs(["base", "other"], root / "runs").tokenizers_differ


def test_unknown_run_exits_2_listing_the_runs(root):
    proc = run_cli("compare", "base", "nope", cwd=root)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: nope: no run there (no config.yaml); runs in runs/: base, bytes, empty, other"]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    with pytest.raises(ConfigError, match="at least two runs"):
        compare_runs(["base"], root / "runs")
    proc = run_cli("compare", "base", "runs/base", cwd=root)
    assert proc.returncode == 2 and "give each run once" in proc.stderr


def test_a_run_with_nothing_logged_shows_dashes(root):
    png = root / "empty.png"
    proc = run_cli("compare", "base", "empty", "--out", str(png), cwd=root)
    assert proc.returncode == 0, proc.stderr
    line = _line(proc.stdout, "val loss (final)")
    assert line.count("—") == 2  # the value and its delta
    assert _line(proc.stdout, "params").count("—") == 2
    assert _assert_png(png)[0] > 0
    proc = run_cli("compare", "empty", "base", "--json", "--no-plot", cwd=root)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    entry = report["comparison"]["training"]["final_val_loss"]
    assert entry["values"]["empty"] is None and entry["delta"]["base"] is None
    assert "mul_token_usage" not in report["comparison"]  # neither run counts mul tokens


def test_png_default_path_and_sweep_panel(root, cli_base_other):
    _, png, _ = cli_base_other
    width_sweep, height = _assert_png(png)
    proc = run_cli("compare", "base", "bytes", cwd=root)  # no sweeps in bytes; base has one
    assert proc.returncode == 0, proc.stderr
    default = root / "compare" / "base_vs_bytes.png"
    assert "plot: compare/base_vs_bytes.png" in proc.stdout and default.is_file()
    assert _assert_png(default)[0] == width_sweep  # base's sweep still gets its panel
    proc = run_cli("compare", "bytes", "empty", cwd=root)  # no sweeps at all: one panel
    assert proc.returncode == 0, proc.stderr
    width_one, _ = _assert_png(root / "compare" / "bytes_vs_empty.png")
    assert width_one * 2 == width_sweep


# --------------------------------------------------------------------------------------
# Hand-written run folders: every value, and so every "better" verdict, is set here by hand.
# --------------------------------------------------------------------------------------


def _hand_run(runs: Path, name: str, summary: dict, evals: dict[str, dict]) -> None:
    folder = runs / name
    (folder / "eval").mkdir(parents=True)
    (folder / "config.yaml").write_text("name: " + name + "\n")
    (folder / "summary.json").write_text(json.dumps(summary))
    for task, record in evals.items():
        (folder / "eval" / f"{task}.json").write_text(json.dumps({"task": task, "version": "1", **record}))


def test_better_values_of_hand_written_runs(tmp_path):
    runs = tmp_path / "runs"
    # base: val loss 2.0, bpb 1.20, accuracy 0.40; other: 1.5, 1.35, 0.30
    for name, loss, bpb, acc in (("base", 2.0, 1.20, 0.40), ("other", 1.5, 1.35, 0.30)):
        _hand_run(runs, name, {"params": 1000, "final_val_loss": loss, "wall_time_s": 10.0 if name == "base" else 8.0},
                  {"perplexity": {"metrics": {"bpb": bpb}, "headline": "bpb"},
                   "gsm8k": {"metrics": {"accuracy": acc, "total": 100.0}, "headline": "accuracy",
                             "directions": {"accuracy": "higher", "total": "neither"}}})
    comp = compare_runs(["base", "other"], runs)
    assert comp.row("final_val_loss").best_index == 1      # 1.5 < 2.0
    assert comp.row("best_val_ppl").best_index is None      # no val rows logged: no value
    assert comp.row("perplexity.bpb").best_index == 0      # 1.20 < 1.35
    assert comp.row("gsm8k.accuracy").best_index == 0      # 0.40 > 0.30
    assert comp.row("gsm8k.total").best_index is None      # a count: neither
    assert comp.row("wall_time_s").best_index == 1         # 8 s < 10 s
    report = comp.to_report()["comparison"]
    assert report["perplexity"]["better"] == "base"
    assert report["perplexity"]["relative_improvement"]["other"] == pytest.approx(-(1.35 - 1.20) / 1.20)
    assert report["gsm8k"]["relative_improvement"]["other"] == pytest.approx((0.30 - 0.40) / 0.40)


def test_direction_comes_from_the_result_file_not_the_metric_name(tmp_path):
    """error_rate reads 'higher is better' and total_solved 'no direction' by their names; the
    task's declaration in the result file says otherwise, and compare follows it. A result
    file without declarations (written before they existed) keeps the name rule."""
    runs = tmp_path / "runs"
    declared = {"error_rate": "lower", "total_solved": "higher", "mean_loss": "lower"}
    values = {"base": {"error_rate": 0.30, "total_solved": 70.0, "mean_loss": 2.0},
              "other": {"error_rate": 0.10, "total_solved": 90.0, "mean_loss": 1.8}}
    for name in ("base", "other"):
        _hand_run(runs, name, {}, {
            "quiz": {"metrics": values[name], "headline": "error_rate", "directions": declared},
            "quiz_old": {"metrics": values[name], "headline": "error_rate"},  # an old file: no directions
        })
    comp = compare_runs(["base", "other"], runs)
    assert comp.row("quiz.error_rate").lower_is_better is True and comp.row("quiz.error_rate").best_index == 1
    assert comp.row("quiz.total_solved").lower_is_better is False and comp.row("quiz.total_solved").best_index == 1
    report = comp.to_report()
    assert report["comparison"]["quiz"]["better"] == "other"
    assert report["comparison"]["quiz"]["relative_improvement"]["other"] == pytest.approx((0.30 - 0.10) / 0.30)
    assert report["runs"]["base"]["evals"]["quiz"]["directions"] == declared
    # the fallback for old files: by name, error_rate "higher" (wrong, hence the declarations), a total "neither"
    assert comp.row("quiz_old.error_rate").lower_is_better is False and comp.row("quiz_old.error_rate").best_index == 0
    assert comp.row("quiz_old.total_solved").best_index is None
    assert comp.row("quiz_old.mean_loss").best_index == 1


def test_a_sweep_only_task_takes_its_directions_from_the_step_files(tmp_path):
    runs = tmp_path / "runs"
    for name, final in (("base", 0.25), ("other", 0.15)):
        _hand_run(runs, name, {}, {})
        folder = runs / name / "eval" / "quiz"
        folder.mkdir()
        points = [{"step": 10, "tokens": 100, "metrics": {"error_rate": 0.5}},
                  {"step": 20, "tokens": 200, "metrics": {"error_rate": final}}]
        (folder / "checkpoint_results.json").write_text(json.dumps(points))
        for p in points:
            (folder / f"step_{p['step']:07d}.json").write_text(json.dumps(
                {"task": "quiz", "headline": "error_rate", "metrics": p["metrics"],
                 "directions": {"error_rate": "lower"}}))
    row = compare_runs(["base", "other"], runs).row("quiz.error_rate")
    assert row.values == [0.25, 0.15] and row.lower_is_better is True and row.best_index == 1


def test_task_results_declare_a_direction_for_every_metric():
    from lmkit.evaluation import arithmetic, gsm8k, hellaswag, probes, sample
    from lmkit.evaluation.task import TaskResult

    assert gsm8k.DIRECTIONS["accuracy"] == gsm8k.DIRECTIONS["accuracy_legacy"] == "higher"
    assert gsm8k.DIRECTIONS["mean_response_tokens"] == "neither"
    assert arithmetic.DIRECTIONS["paren_gap"] == "neither" and arithmetic.DIRECTIONS["legacy_acc_flat"] == "higher"
    assert hellaswag.DIRECTIONS == dict.fromkeys(("acc", "acc_norm", "acc_norm_chars", "acc_harness"), "higher")
    assert {k for k, v in probes.DIRECTIONS.items() if v == "higher"} == {"accuracy", "acc_mul_table",
                                                                           "acc_mul_multidigit", "acc_addition"}
    assert probes.DIRECTIONS["total_mul_tokens"] == probes.DIRECTIONS["mul_tokens_per_probe"] == "neither"
    assert set(sample.DIRECTIONS.values()) == {"neither"}
    result = TaskResult(task="t", version="1", metrics={"a": 1.0, "b": 2.0}, headline="a", n_items=1,
                        directions={"a": "lower", "unused": "higher"})
    assert result.to_dict()["directions"] == {"a": "lower"}  # only the metrics reported
    assert result.direction("a") == "lower" and result.direction("b") == "higher"  # b: the name fallback
    with pytest.raises(ValueError, match="higher, lower, neither"):
        TaskResult(task="t", version="1", metrics={"a": 1.0}, headline="a", n_items=1, directions={"a": "up"})


def test_finite_is_one_function_used_by_compare():
    import lmkit.compare
    from lmkit.numbers import finite

    value = {"ppl": float("inf"), "xs": (1.0, float("nan"), -float("inf")), "n": 3, "s": "inf", "ok": 2.5}
    assert finite(value) == {"ppl": None, "xs": [1.0, None, None], "n": 3, "s": "inf", "ok": 2.5}
    assert lmkit.compare.finite is finite and not hasattr(lmkit.compare, "_finite")


def test_results_on_different_numbers_of_items_warn_and_show_the_counts(tmp_path):
    """A --limit 3 perplexity next to a full-split one: the same data file, not the same items."""
    runs = tmp_path / "runs"
    for name, n, limit in (("full", 123, None), ("cut", 3, 3)):
        _hand_run(runs, name, {}, {"perplexity": {"metrics": {"bpb": 1.2}, "headline": "bpb", "n_items": n,
                                                  "limit": limit, "data_sha256": "same"}})
    comp = compare_runs(["full", "cut"], runs)
    assert comp.row("perplexity.n_items").values == [123, 3]
    assert any("different numbers of items (full: 123, cut: 3 (--limit 3))" in note for note in comp.notes)
    _hand_run(runs, "full2", {}, {"perplexity": {"metrics": {"bpb": 1.1}, "headline": "bpb", "n_items": 123}})
    same = compare_runs(["full", "full2"], runs)
    assert not any("numbers of items" in note for note in same.notes)
    with pytest.raises(KeyError):
        same.row("perplexity.n_items")  # equal counts: no extra row
