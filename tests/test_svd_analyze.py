"""lmkit svd-analyze: a tiny 3-checkpoint run analysed, checked against numpy, scipy and weightwatcher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lmkit.analysis.spectral import (
    LeftSubspaces,
    effective_rank,
    energy_rank,
    largest_principal_angle,
    singular_values,
    spectrum_metrics,
)
from lmkit.analysis.svd_analyze import analyze_run, write_outputs
from lmkit.analysis.svd_log import read_svd_log
from lmkit.cli import app
from lmkit.config import build_run_config
from lmkit.errors import CheckpointError, ConfigError
from lmkit.events import SVDAnalysis
from lmkit.training.loop import train

from conftest import TINY_PRESET

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the tests share two cores with others (spin-waiting threads cost 3x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny GPT (2 layers, 32 wide, tied head) trained 6 steps, checkpoints at 2, 4, 6 (+ latest/best
    hard links of step 6)."""
    root = tmp_path_factory.mktemp("svd-runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("LMKIT_CACHE_DIR", str(root / "cache"))
    preset = root / "tiny.yaml"
    preset.write_text(TINY_PRESET.format(pos="rope", steps=6, eval_interval=6, ckpt_interval=2))
    train(build_run_config(str(preset), ["training.keep_last=5"],
                           {"out_dir": ("--out-dir", str(root)), "name": ("--name", "t3")}))
    mp.undo()
    return root / "t3"


@pytest.fixture(scope="module")
def report(run):
    events = []
    rep = analyze_run(run, emit=events.append)
    rep.events = events
    return rep


def _weight(run: Path, step: int, name: str) -> np.ndarray:
    """A weight straight from the checkpoint file (not through the model), float64."""
    state = torch.load(run / "checkpoints" / f"step_{step:07d}.pt", map_location="cpu", weights_only=True)
    return state["model"][f"{name}.weight"].double().numpy()


def test_report_covers_every_matrix_once_per_distinct_checkpoint(run, report, tmp_path):
    assert [c["step"] for c in report.checkpoints] == [2, 4, 6]  # latest/best are links of step 6
    names = list(report.layers)
    assert names[0] == "transformer.wte" and report.layers["transformer.wte"]["aliases"] == ["lm_head"]  # tied
    assert names[1:] == [f"transformer.h.{i}.{m}" for i in range(2)
                         for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert report.layers["transformer.h.0.attn.c_attn"]["shape"] == [96, 32]
    progress = report.events
    assert [e.completed for e in progress] == list(range(1, 28)) and {e.total for e in progress} == {27}

    written = write_outputs(report, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert written[0] == tmp_path / "out" / "analysis.json"
    assert {"format", "run", "name", "k", "checkpoints", "layers", "svd_log", "files"} <= set(data)
    assert data["svd_log"] is None and data["k"] == 10
    rec = data["layers"]["transformer.h.1.mlp.c_fc"]["checkpoints"][1]
    assert {"step", "mode", "r", "k", "singular_values", "effective_rank", "stable_rank", "energy_rank_90",
            "energy_rank_99", "energy_rank_999", "condition_number", "spectral_norm", "alpha", "alpha_weighted",
            "log_spectral_norm", "mp_softrank", "powerlaw", "subspace_angle", "delta_in_topk",
            "relative_change"} <= set(rec)
    assert rec["powerlaw"]["status"] == "success" and rec["alpha"] > 1
    first = data["layers"]["transformer.h.1.mlp.c_fc"]["checkpoints"][0]
    assert first["subspace_angle"] is None and first["delta_in_topk"] is None
    pngs = {Path(p).name for p in data["files"]}
    assert pngs == {"spectra.png", "ranks.png", "changes.png"}
    for name in pngs:
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC


def test_metrics_match_independent_computations(run, report):
    from scipy.stats import entropy

    for name in ("transformer.wte", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"):
        rec = report.layers[name]["checkpoints"][2]
        w = _weight(run, 6, name)
        s = np.linalg.svd(w, compute_uv=False)
        np.testing.assert_allclose(rec["singular_values"], s, rtol=1e-5, atol=1e-7)
        assert rec["effective_rank"] == pytest.approx(np.exp(entropy(s)), rel=1e-5)  # scipy normalises s to sum 1
        assert rec["stable_rank"] == pytest.approx(np.linalg.norm(w, "fro") ** 2 / np.linalg.norm(w, 2) ** 2, rel=1e-5)
        assert rec["condition_number"] == pytest.approx(np.linalg.cond(w), rel=1e-4)
        total, running, needed = (s**2).sum(), 0.0, 0
        while running < 0.99 * total:  # a plain loop, not cumsum
            running += s[needed] ** 2
            needed += 1
        assert rec["energy_rank_99"] == needed
    # the definitions' fixed points (Roy & Vetterli 2007: erank(I_n) = n, rank-1 -> 1)
    assert effective_rank(np.ones(7)) == pytest.approx(7.0)
    assert effective_rank(np.array([3.0, 0, 0])) == pytest.approx(1.0)
    assert energy_rank(np.array([3.0, 4.0]), 0.9) == 2 and energy_rank(np.array([4.0, 1.0]), 0.9) == 1


def test_angles_and_delta_match_scipy(run, report):
    from scipy.linalg import subspace_angles

    name = "transformer.h.0.mlp.c_fc"
    w4, w6 = _weight(run, 4, name), _weight(run, 6, name)
    u4 = np.linalg.svd(w4, full_matrices=False)[0][:, :10]
    u6 = np.linalg.svd(w6, full_matrices=False)[0][:, :10]
    rec = report.layers[name]["checkpoints"][2]
    assert rec["k"] == 10
    assert rec["subspace_angle"] == pytest.approx(subspace_angles(u4, u6).max(), abs=2e-4)
    delta = w6 - w4
    assert rec["delta_in_topk"] == pytest.approx(np.linalg.norm(u4.T @ delta) / np.linalg.norm(delta), rel=1e-4)
    assert rec["relative_change"] == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(w4), rel=1e-5)
    # wide (m < n) and tall (m > n) bases against scipy, at a large angle too
    g = torch.Generator().manual_seed(0)
    for shape in ((12, 40), (40, 12)):
        a, b = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        ua = np.linalg.svd(a.double().numpy(), full_matrices=False)[0][:, :4]
        ub = np.linalg.svd(b.double().numpy(), full_matrices=False)[0][:, :4]
        mine = largest_principal_angle(LeftSubspaces(a).top(4), LeftSubspaces(b).top(4))
        assert mine == pytest.approx(subspace_angles(ua, ub).max(), abs=1e-5)
    assert LeftSubspaces(torch.zeros(5, 3)).top(2) is None  # no subspace to compare (zero-initialised layer)


def test_identical_checkpoints_have_angle_zero(run, tmp_path):
    copy = tmp_path / "copy_of_step6.pt"
    shutil.copyfile(run / "checkpoints" / "step_0000006.pt", copy)  # a different file, the same weights
    rep = analyze_run(run, checkpoints=["step_0000006", "latest", str(copy)], layers=["*h.0.*"], heavy_tail=False)
    assert [c["step"] for c in rep.checkpoints] == [6, 6]  # latest is a hard link of step 6: once
    for layer in rep.layers.values():
        again = layer["checkpoints"][1]
        assert again["subspace_angle"] < 1e-12  # rounding only (arccos of the cosines would give ~1e-8)
        assert again["relative_change"] == 0.0 and again["delta_in_topk"] is None  # ΔW = 0


def test_adaptive_svd_layers_use_the_effective_weight_and_k_g_minus_r(run, tmp_path):
    from lmkit.models.svd_linear import AdaptiveSVDLinear
    from lmkit.runs import load_run
    from lmkit.training.checkpoint import load_checkpoint, save_checkpoint

    copy = tmp_path / "t3lowrank"
    shutil.copytree(run, copy)
    name = "transformer.h.0.mlp.c_fc"  # 64 x 32: g = 32
    effective = {}
    for step, r in ((4, 20), (6, 24)):  # low-rank checkpoints, as an adaptive-SVD run writes them
        path = copy / "checkpoints" / f"step_{step:07d}.pt"
        model = load_run(copy, str(path), fold=False).model
        layer = AdaptiveSVDLinear(model.get_submodule(name))
        model.swap_module(name, layer)
        layer.switch_to_lowrank(r, svd="cpu")
        with torch.no_grad():
            layer.lora_B.mul_(3.0)  # now W_p + B A differs from the stored (unused) W
        state = load_checkpoint(path)
        state["model"] = model.state_dict()
        save_checkpoint(state, path)
        sd = state["model"]
        effective[step] = (sd[f"{name}.weight_principal"] + sd[f"{name}.lora_B"] @ sd[f"{name}.lora_A"]).double().numpy()
    rep = analyze_run(copy, layers=[name], heavy_tail=False)
    layer_report = rep.layers[name]
    assert layer_report["kind"] == "adaptive_svd"
    plain, low4, low6 = layer_report["checkpoints"]
    assert (plain["mode"], plain["r"], plain["k"]) == (None, None, 10)  # step 2 is a plain linear
    assert (low4["mode"], low4["r"], low4["k"]) == ("lowrank", 20, 12)
    assert (low6["mode"], low6["r"], low6["k"]) == ("lowrank", 24, 8)
    for rec, step in ((low4, 4), (low6, 6)):
        np.testing.assert_allclose(rec["singular_values"], np.linalg.svd(effective[step], compute_uv=False),
                                   rtol=1e-5, atol=1e-6)
    from scipy.linalg import subspace_angles

    u4 = np.linalg.svd(effective[4], full_matrices=False)[0][:, :8]
    u6 = np.linalg.svd(effective[6], full_matrices=False)[0][:, :8]
    assert low6["subspace_angle"] == pytest.approx(subspace_angles(u4, u6).max(), abs=2e-4)


def test_a_non_finite_weight_is_reported_not_fatal(run, tmp_path):
    from lmkit.training.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(run / "checkpoints" / "step_0000004.pt")
    state["model"]["transformer.h.0.attn.c_proj.weight"][0, 0] = float("nan")
    bad = tmp_path / "diverged.pt"
    save_checkpoint(state, bad)
    rep = analyze_run(run, checkpoints=["step_0000002", str(bad), "step_0000006"], layers=["*h.0.attn.c_*"],
                      heavy_tail=False)
    c_proj = rep.layers["transformer.h.0.attn.c_proj"]["checkpoints"]
    assert c_proj[1]["error"] == "non-finite values in the weight"
    assert c_proj[2]["subspace_angle"] is None and c_proj[2]["effective_rank"] > 1  # no comparison across it
    assert rep.layers["transformer.h.0.attn.c_attn"]["checkpoints"][2]["subspace_angle"] is not None
    json.dumps(rep.to_dict(), allow_nan=False)


def _shim_powerlaw_2(monkeypatch):
    """weightwatcher passes ``distribution=`` to ``powerlaw.Fit``: powerlaw 1.x swallowed it, 2.0
    raises (so weightwatcher's pl_package='powerlaw' path always fails there), and 2.0 caps alpha at 3.
    Restore 1.x's behaviour: drop the keyword and keep 1.x's alpha range (alpha > 1)."""
    import powerlaw
    from weightwatcher import WW_powerlaw

    if "distribution" in __import__("inspect").signature(powerlaw.Fit.__init__).parameters:
        return
    original = powerlaw.Fit

    class Fit1x(original):
        def __init__(self, data, *args, distribution=None, **kwargs):
            kwargs.setdefault("parameter_ranges", {"alpha": [1, None]})
            super().__init__(data, *args, **kwargs)

    class OnlyForWeightwatcher:  # lmkit's own `powerlaw.Fit` calls stay unpatched
        Fit = Fit1x

        def __getattr__(self, name):
            return getattr(powerlaw, name)

    monkeypatch.setattr(WW_powerlaw, "powerlaw", OnlyForWeightwatcher())


def test_alpha_and_stable_rank_match_weightwatcher(monkeypatch):
    ww = pytest.importorskip("weightwatcher")
    import logging

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    _shim_powerlaw_2(monkeypatch)
    torch.manual_seed(0)
    shapes = [(128, 64), (96, 128), (40, 40), (100, 50)]  # tall, wide, square (the quarter-circle MP branch)
    model = torch.nn.Sequential(*[torch.nn.Linear(n_in, n_out, bias=False) for n_out, n_in in shapes])
    with torch.no_grad():
        for i, layer in enumerate(model[:3]):  # heavy-tailed entries, as trained layers have
            layer.weight.copy_(torch.distributions.StudentT(2.0 + i).sample(layer.weight.shape) * 0.05)
        model[3].weight.normal_(0, 0.05)  # Gaussian: a light tail, alpha well above 3
    watcher = ww.WeightWatcher(model=model)
    details = {pkg: watcher.analyze(pl_package=pkg, mp_fit=pkg == "powerlaw") for pkg in ("powerlaw", "ww")}
    for i, layer in enumerate(model):
        mine = spectrum_metrics(singular_values(layer.weight), tuple(layer.weight.shape))
        theirs = details["powerlaw"].iloc[i]
        assert theirs["status"] == "success"
        assert mine["alpha"] == pytest.approx(theirs["alpha"], rel=1e-4)
        assert mine["powerlaw"]["xmin"] == pytest.approx(theirs["xmin"], rel=1e-4)
        assert mine["stable_rank"] == pytest.approx(theirs["stable_rank"], rel=1e-5)
        assert mine["alpha_weighted"] == pytest.approx(theirs["alpha_weighted"], rel=1e-4, abs=1e-5)
        assert mine["log_spectral_norm"] == pytest.approx(theirs["log_spectral_norm"], abs=1e-6)
        assert mine["mp_softrank"] == pytest.approx(theirs["mp_softrank"], rel=1e-3)
        if i == 3:
            assert mine["alpha"] > 3.5  # what powerlaw 2.0's default alpha range [0, 3] would hide
        # weightwatcher's own fitter (no powerlaw package) finds the same exponent
        assert mine["alpha"] == pytest.approx(details["ww"].iloc[i]["alpha"], rel=1e-3)


def _record(step, layer, mode, r, action, reason, mode_after, r_after, **metrics):
    return SVDAnalysis(step=step, layer=layer, mode=mode, r=r, r_next=r_after, metrics=metrics, reason=reason,
                       action=action, mode_after=mode_after, r_after=r_after, seconds=0.01).to_dict()


def test_svd_log_timeline_and_switches(run, tmp_path):
    copy = tmp_path / "t3svd"
    shutil.copytree(run, copy)
    layer = "transformer.h.0.attn.c_attn"
    lines = [
        json.dumps(_record(20, layer, "full", None, "snapshot", "initial_svd_computation", "full", None)),
        "{not json",
        json.dumps(_record(40, layer, "full", None, "to_lowrank", "gradient_clobbering_risk", "lowrank", 22,
                           principal_alignment=0.45, minor_alignment=0.5, subspace_angle=0.02)),
        json.dumps({"kind": "svd_analysis", "layer": layer}),  # no step
        json.dumps(_record(60, layer, "lowrank", 22, "refactor", "continue_current_mode", "lowrank", 26,
                           principal_alignment=0.2, minor_alignment=0.9, reconstruction_error=float("nan"))),
        json.dumps(_record(80, layer, "lowrank", 26, "to_full", "reconstruction_unsafe", "full", 26,
                           principal_alignment=0.1, reconstruction_error=0.05)),
        "[1, 2]",
        "",
    ]
    (copy / "svd.jsonl").write_text("\n".join(lines) + "\n")
    log = read_svd_log(copy / "svd.jsonl")
    assert log["records"] == 4 and log["skipped_lines"] == 3
    entry = log["layers"][layer]
    assert entry["step"] == [20, 40, 60, 80]
    assert entry["mode_after"] == ["full", "lowrank", "lowrank", "full"] and entry["r_after"] == [None, 22, 26, 26]
    assert entry["metrics"]["principal_alignment"] == [None, 0.45, 0.2, 0.1]
    assert entry["metrics"]["reconstruction_error"] == [None, None, None, 0.05]  # "nan" -> null
    assert [(s["step"], s["to_mode"], s["r"], s["reason"]) for s in log["switches"]] == [
        (40, "lowrank", 22, "gradient_clobbering_risk"), (80, "full", 26, "reconstruction_unsafe")]
    assert [(s["step"], s["r"], s["r_after"]) for s in log["refactors"]] == [(60, 22, 26)]

    out = tmp_path / "out"
    result = runner.invoke(app, ["svd-analyze", str(copy), "--layers", layer, "--no-heavy-tail", "--threads", "1",
                                 "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["svd_log"]["switches"] == log["switches"] and data["svd_log"]["skipped_lines"] == 3
    assert data["svd_log"]["thresholds"]["principal_danger"] == 0.3  # the run's (default, adjusted) thresholds
    assert list(data["layers"]) == [layer]
    for name in ("svd_timeline.png", "svd_alignments.png", "spectra.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_cli_tables_and_default_out_dir(run, tmp_path):
    copy = tmp_path / "t3cli"
    shutil.copytree(run, copy)
    result = runner.invoke(app, ["svd-analyze", str(copy), "--layers", "lm_head", "--layers", "*h.1.mlp.c_fc",
                                 "--checkpoint", "step_0000004", "--checkpoint", "best", "--threads", "1"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "t3cli @ step 4" in out and "t3cli @ step 6" in out and "@ step 2" not in out
    assert "transformer.wte (= lm_head)" in out and "transformer.h.1.mlp.c_fc" in out
    assert (copy / "svd" / "analysis.json").is_file() and (copy / "svd" / "spectra.png").is_file()


def _one_line_error(result, exit_code: int, *needles: str) -> None:
    assert result.exit_code == exit_code, result.output
    stderr = result.stderr.strip()
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    for needle in needles:
        assert needle in stderr, stderr


def test_errors_are_one_line_exit_2(run, tmp_path):
    _one_line_error(runner.invoke(app, ["svd-analyze", str(tmp_path / "nope")]), 2, "no run there")
    _one_line_error(runner.invoke(app, ["svd-analyze", str(run), "--layers", "*.c_q", "--threads", "1"]), 2,
                    "--layers '*.c_q' matches no weight matrix")
    _one_line_error(runner.invoke(app, ["svd-analyze", str(run), "-c", "step_0000099", "--threads", "1"]), 2,
                    "no such checkpoint")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(run / "config.yaml", bare / "config.yaml")
    _one_line_error(runner.invoke(app, ["svd-analyze", str(bare), "--threads", "1"]), 2, "no checkpoints")
    with pytest.raises(CheckpointError):
        analyze_run(bare)
    with pytest.raises(ConfigError):
        analyze_run(run, layers=["nothing*"], heavy_tail=False)
