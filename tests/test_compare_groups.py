"""lmkit compare --group: n, mean ± std, 95% t-interval and Welch's test against hand-worked
numbers; "no noise estimate" for one run per side (grouped and plain); one-line errors; the
real CLI on tiny runs trained here with different seeds."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from lmkit.compare import Row, compare_runs
from lmkit.compare_groups import (
    NO_NOISE,
    compare_groups,
    describe,
    group_verdict,
    parse_groups,
    single_run_verdicts,
    welch_p,
)
from lmkit.errors import ConfigError

from conftest import TINY_PRESET, run_cli, shared


def _cli(*args: str, cwd: Path):
    """``lmkit ARGS`` in this process (typer's runner), from folder ``cwd``."""
    import os

    from typer.testing import CliRunner

    from lmkit.cli import app

    here = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        os.chdir(here)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _t4_cdf(t: float) -> float:
    """Student's t CDF with 4 degrees of freedom in closed form (e.g. Wikipedia, "Student's
    t-distribution", table of CDFs): 1/2 + 3/8 · x/sqrt(1 + x²/4) · (1 − x²/(12 (1 + x²/4)))."""
    u = 1 + t * t / 4
    return 0.5 + 3 / 8 * t / math.sqrt(u) * (1 - t * t / (12 * u))


def test_t_interval_by_hand():
    # 3.1, 3.2, 3.3: mean 3.2, sample std sqrt(0.02 / 2) = 0.1; t(0.975, 2) = 4.3027 (t table)
    s = describe([3.1, 3.2, None, 3.3])
    assert s.n == 3 and s.mean == pytest.approx(3.2) and s.std == pytest.approx(0.1)
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert s.ci == pytest.approx((3.2 - half, 3.2 + half), abs=1e-5)
    # n = 2: t(0.975, 1) = 12.7062; 1.0, 2.0: std sqrt(0.5)
    s2 = describe([1.0, 2.0])
    assert s2.ci == pytest.approx((1.5 - 12.7062 * math.sqrt(0.5) / math.sqrt(2),
                                   1.5 + 12.7062 * math.sqrt(0.5) / math.sqrt(2)), abs=1e-3)
    one = describe([4.0])
    assert (one.n, one.mean, one.std, one.ci) == (1, 4.0, None, None)


def test_welch_p_by_hand_and_against_scipy_on_raw_samples():
    # equal n = 3 and equal variances 0.01: t = 0.2 / sqrt(2 · 0.01 / 3) = 2.4495, Welch df = 4 exactly
    a, b = [3.1, 3.2, 3.3], [2.9, 3.0, 3.1]
    t = 0.2 / math.sqrt(2 * 0.01 / 3)
    assert welch_p(a, b) == pytest.approx(2 * (1 - _t4_cdf(t)), rel=1e-6)  # ≈ 0.0705: not significant
    # unequal sizes and spreads: Welch differs from the pooled-variance test; the reference is scipy
    # itself on these raw samples
    from scipy import stats

    x, y = [0.31, 0.29, 0.33, 0.30, 0.32], [0.35, 0.42, 0.38]
    welch = stats.ttest_ind(x, y, equal_var=False).pvalue
    pooled = stats.ttest_ind(x, y, equal_var=True).pvalue
    assert abs(welch - pooled) > 1e-3
    assert welch_p(x, y) == pytest.approx(welch, rel=1e-9)
    assert welch_p([1.0], [2.0, 3.0]) is None and welch_p([5.0, 5.0], [5.0, 5.0]) is None


def _row(values, lower=True, key="final_val_loss") -> Row:
    return Row(key, "val loss (final)", "loss", list(values), lower_is_better=lower)


def test_group_verdicts_need_noise_and_significance():
    # far apart (t = 13.5, df 4): the second group is better (lower loss); 0.2 apart: p = 0.0705, not significant
    far = group_verdict(_row([]), [describe([3.1, 3.2, 3.3]), describe([2.0, 2.1, 2.2])])
    assert far.better == 1 and far.p_value < 0.05 and "Welch" in far.basis
    near = group_verdict(_row([]), [describe([3.1, 3.2, 3.3]), describe([2.9, 3.0, 3.1])])
    assert near.better is None and near.p_value == pytest.approx(0.0705, abs=1e-3)
    higher = group_verdict(_row([], lower=False), [describe([3.1, 3.2, 3.3]), describe([2.0, 2.1, 2.2])])
    assert higher.better == 0
    single = group_verdict(_row([]), [describe([3.1]), describe([2.0])])
    assert single.better is None and single.p_value is None and single.basis == NO_NOISE
    assert "no noise estimate" in NO_NOISE
    assert group_verdict(_row([], lower=None), [describe([1, 2]), describe([5, 6])]).better is None


def _hand_run(runs: Path, name: str, summary: dict, evals: dict | None = None) -> None:
    folder = runs / name
    (folder / "eval").mkdir(parents=True)
    (folder / "config.yaml").write_text("name: " + name + "\n")
    (folder / "summary.json").write_text(json.dumps(summary))
    for task, record in (evals or {}).items():
        (folder / "eval" / f"{task}.json").write_text(json.dumps({"task": task, "version": "1", **record}))


def test_plain_compare_calls_nothing_better_without_a_noise_estimate(tmp_path):
    """Two seeds 0.0027 apart in val loss: the difference is shown, nobody is called better. An eval
    metric with its own stderr gets a z-test: 0.30 vs 0.40 (se 0.01 each, z = 7.07) is better;
    0.30 vs 0.31 (z = 0.707, two-sided p = 0.4795 from a normal table) is not."""
    runs = tmp_path / "runs"
    for name, loss, far, near in (("s1", 3.2131, 0.30, 0.30), ("s2", 3.2104, 0.40, 0.31)):
        _hand_run(runs, name, {"params": 1000, "final_val_loss": loss},
                  {"lm-eval:quiz": {"metrics": {"acc": far, "acc_stderr": 0.01, "acc_norm": near,
                                                "acc_norm_stderr": 0.01},
                                    "headline": "acc_norm",
                                    "directions": {"acc": "higher", "acc_norm": "higher", "acc_stderr": "neither",
                                                   "acc_norm_stderr": "neither"}}})
    comp = compare_runs(["s1", "s2"], runs)
    assert comp.row("final_val_loss").best_index == 1  # the raw direction still says s2 is lower
    verdicts = single_run_verdicts(comp)
    loss = verdicts["final_val_loss"]
    assert loss.better is None and loss.basis.startswith(NO_NOISE)
    assert verdicts["lm-eval:quiz.acc"].better == 1
    near = verdicts["lm-eval:quiz.acc_norm"]
    assert near.better is None and near.p_value == pytest.approx(0.4795, abs=1e-4)

    proc = _cli("compare", "s1", "s2", "--no-plot", "--json-out", "r.json", cwd=tmp_path)
    assert proc.exit_code == 0, proc.output
    report = json.loads((tmp_path / "r.json").read_text())["comparison"]
    val = report["training"]["final_val_loss"]
    assert val["better"] is None and val["delta"]["s2"] == pytest.approx(-0.0027)
    assert val["better_basis"].startswith(NO_NOISE)
    assert report["lm-eval:quiz"]["metrics"]["acc"]["better"] == "s2"
    assert report["lm-eval:quiz"]["better"] is None  # the headline (acc_norm): not significant
    table = proc.stdout
    line = next(ln for ln in table.splitlines() if ln.startswith("│ val loss (final) "))
    assert "*" not in line and "-0.0027" in line
    assert "No value is called better" in table
    acc_line = next(ln for ln in table.splitlines() if ln.startswith("│ acc "))
    assert re.search(r"0\.4000 \*", acc_line)


def test_group_errors_are_one_line(tmp_path):
    runs = tmp_path / "runs"
    for name in ("a1", "a2", "b1"):
        _hand_run(runs, name, {"final_val_loss": 1.0})
    for specs, needle in ((["a=a1,a2"], "at least two groups"), (["a=a1", "a=a2"], "named twice"),
                          (["a=a1,a2", "b=a2"], "already in group a"), (["a1,a2", "b=b1"], "NAME=RUN"),
                          (["a=", "b=b1"], "NAME=RUN")):
        with pytest.raises(ConfigError, match=needle):
            parse_groups(specs)
    with pytest.raises(ConfigError, match=r"--group b: nope: no run there"):
        compare_groups(["a=a1,a2", "b=b1,nope"], runs)
    proc = run_cli("compare", "--group", "a=a1,a2", "--group", "b=b1,nope", "--no-plot", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--group b" in lines[0] and "nope" in lines[0] and "runs in runs/: a1, a2, b1" in lines[0]
    both = _cli("compare", "a1", "--group", "a=a1", "--group", "b=b1", "--no-plot", cwd=tmp_path)
    assert both.exit_code == 2 and "not both" in both.output


def test_single_run_groups_say_no_noise_estimate(tmp_path):
    runs = tmp_path / "runs"
    _hand_run(runs, "a1", {"final_val_loss": 3.2131})
    _hand_run(runs, "b1", {"final_val_loss": 3.2104})
    proc = _cli("compare", "--group", "base=a1", "--group", "mul=b1", "--no-plot", cwd=tmp_path)
    assert proc.exit_code == 0, proc.output
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("│ val loss (final) "))
    assert "no noise estimate (n=1)" in line and "*" not in line
    assert "one run only" in proc.stdout


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory) -> Path:
    """runs/{slow1, slow2, fast1, fast2}: tiny char-level runs on 6,000 characters of Shakespeare,
    seeds 1 and 2, lr 1e-5 ("slow": the loss barely moves) and 3e-3 ("fast"), 6 steps each."""
    from lmkit.config import build_run_config
    from lmkit.training.loop import train

    root = tmp_path_factory.mktemp("groups")
    preset = root / "tiny.yaml"
    preset.write_text(TINY_PRESET.format(pos="rope", steps=6, eval_interval=3, ckpt_interval=100))
    text = root / "shakespeare.txt"
    text.write_text(shared("tinyshakespeare", "input.txt").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:  # the autouse env fixture is per test
        mp.setenv("LMKIT_CACHE_DIR", str(root / "cache"))
        for name, lr in (("slow", "1.0e-5"), ("fast", "3.0e-3")):
            for seed in (1, 2):
                flags = {"out_dir": ("--out-dir", str(root / "runs")), "name": ("--name", f"{name}{seed}"),
                         "training.seed": ("--seed", seed), "data.dataset": ("--data", str(text)),
                         "data.tokenizer": ("--tokenizer", "char")}
                train(build_run_config(str(preset), [f"training.lr={lr}"], flags))
    return root


def test_cli_groups_on_tiny_runs(seed_runs):
    from scipy import stats

    root = seed_runs
    png, report_path = root / "fig" / "groups.png", root / "groups.json"
    proc = _cli("compare", "--group", "slow=slow1,slow2", "--group", "fast=fast1,fast2", "--out", str(png),
                "--json-out", str(report_path), cwd=root)
    assert proc.exit_code == 0, proc.output
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    summaries = {n: json.loads((root / "runs" / n / "summary.json").read_text())
                 for n in ("slow1", "slow2", "fast1", "fast2")}
    slow = [summaries[n]["final_val_loss"] for n in ("slow1", "slow2")]
    fast = [summaries[n]["final_val_loss"] for n in ("fast1", "fast2")]
    assert slow[0] != slow[1]  # different seeds, different numbers

    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("│ val loss (final) "))
    assert f"{statistics.mean(slow):.4f} ± {statistics.stdev(slow):.4f}" in line
    assert f"{statistics.mean(fast):.4f} ± {statistics.stdev(fast):.4f}" in line
    assert "slow (n=2)" in proc.stdout and "fast (n=2)" in proc.stdout

    report = json.loads(report_path.read_text())
    row = report["groups"]["rows"]["final_val_loss"]
    assert report["groups"]["runs"] == {"slow": ["slow1", "slow2"], "fast": ["fast1", "fast2"]}
    assert row["stats"]["fast"]["mean"] == pytest.approx(statistics.mean(fast))
    assert row["stats"]["slow"]["per_run"] == {"slow1": slow[0], "slow2": slow[1]}
    half = 12.7062 * statistics.stdev(fast) / math.sqrt(2)  # t(0.975, 1)
    assert row["stats"]["fast"]["ci95"] == pytest.approx([statistics.mean(fast) - half, statistics.mean(fast) + half],
                                                         rel=1e-4)
    p = stats.ttest_ind(slow, fast, equal_var=False).pvalue
    assert row["welch_p_vs_base"]["fast"] == pytest.approx(p, rel=1e-9)
    assert p < 0.05 and statistics.mean(fast) < statistics.mean(slow)  # lr 3e-3 vs 1e-5: a real difference
    assert row["better"] == "fast" and " *" in line and "fast better" in line
    assert f"{p:.3g}" in line
    # the flat per-run report is there too, with the plain compare's honest verdicts
    assert set(report["runs"]) == {"slow1", "slow2", "fast1", "fast2"}
    assert report["comparison"]["training"]["final_val_loss"]["better"] is None

    # two seeds of the same preset, plain compare: the difference is shown, nobody is better
    plain = _cli("compare", "slow1", "slow2", "--no-plot", cwd=root)
    assert plain.exit_code == 0, plain.output
    val = next(ln for ln in plain.stdout.splitlines() if ln.startswith("│ val loss (final) "))
    assert "*" not in val and f"{slow[1] - slow[0]:+.4f}" in val


def test_bands_average_runs_on_a_shared_step_axis():
    from lmkit.compare_groups import band

    # run a logs steps 0, 10, 20; run b 0, 5, 20 (its step 10 is interpolated: 2.5)
    steps, mean, std = band([[(0, 4.0), (10, 3.0), (20, 2.0)], [(0, 4.0), (5, 3.0), (20, 0.0)]])
    assert steps == [0, 5, 10, 20]
    b_at_10 = 3.0 + (0.0 - 3.0) * (10 - 5) / (20 - 5)
    assert mean == pytest.approx([4.0, (3.5 + 3.0) / 2, (3.0 + b_at_10) / 2, 1.0])
    assert std == pytest.approx([0.0, statistics.stdev([3.5, 3.0]), statistics.stdev([3.0, b_at_10]),
                                 statistics.stdev([2.0, 0.0])])
