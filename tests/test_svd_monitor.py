"""Adaptive-SVD training on the monitors: the dashboard's SVD panel, the events panels, the
plain and progress lines, TensorBoard and events.jsonl -- driven by scripted SVDAnalysis /
SVDModeSwitch events (the trainer's order: each analysis, then its switch)."""

from __future__ import annotations

import io
import json
import re

from rich.console import Console
from rich.panel import Panel
from test_dashboard import panel, started, step_event

from lmkit.events import RunFinished, SVDAnalysis, SVDModeSwitch
from lmkit.monitor.console import PlainLog, RichProgress
from lmkit.monitor.dashboard import Dashboard
from lmkit.monitor.svd_panel import SVDState, SVDTable, shorten_layer, shorten_layers
from lmkit.monitor.writers import EventsWriter, TensorBoardWriter

Q = "transformer.h.0.attn.c_q"
METRICS = {"subspace_angle": 0.0123, "principal_alignment": 0.4512, "minor_alignment": 0.8924,
           "reconstruction_error": 0.00412, "energy_rank_99": 201.0, "grad_norm": 0.93}
CALM = {"subspace_angle": 0.2, "principal_alignment": 0.1, "minor_alignment": 0.995,
        "reconstruction_error": 0.0301, "energy_rank_99": 190.0, "grad_norm": 0.5}


def analysis(step: int, layer: str = Q, *, mode: str = "full", r: int | None = 246, r_next: int | None = 246,
             metrics: dict | None = None, reason: str = "continue_current_mode", action: str = "keep",
             mode_after: str | None = None, r_after: int | None = -1) -> SVDAnalysis:
    return SVDAnalysis(step=step, layer=layer, mode=mode, r=r, r_next=r_next,
                       metrics=dict(METRICS if metrics is None else metrics), reason=reason, action=action,
                       mode_after=mode_after or mode, r_after=r if r_after == -1 else r_after, seconds=0.01)


def phase1() -> list:
    """Layer 0's c_q: snapshot, full -> low-rank, a re-factor, low-rank -> full."""
    return [
        analysis(20, r=None, r_next=None, metrics={}, reason="initial_svd_computation", action="snapshot"),
        analysis(40, reason="gradient_clobbering_risk", action="to_lowrank", mode_after="lowrank"),
        SVDModeSwitch(step=40, layer=Q, from_mode="full", to_mode="lowrank", r=246, reason="gradient_clobbering_risk",
                      switches=1),
        analysis(60, mode="lowrank", r_next=196, action="refactor", r_after=196),
        analysis(80, mode="lowrank", r=196, r_next=235, metrics=CALM, reason="reconstruction_unsafe",
                 action="to_full", mode_after="full"),
        SVDModeSwitch(step=80, layer=Q, from_mode="lowrank", to_mode="full", r=196, reason="reconstruction_unsafe",
                      switches=2),
    ]


def dashboard(events: list) -> Dashboard:
    dash = Dashboard(live=False, sampler=False)
    dash(started())
    for step in range(1, 101):
        dash(step_event(step))
    for event in events:
        dash(event)
    return dash


def screen(dash: Dashboard, width: int = 100, height: int = 40) -> str:
    console = Console(record=True, width=width, height=height, file=io.StringIO(), color_system=None)
    console.print(dash)
    return console.export_text()


def flat(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------ the SVD panel


def test_no_svd_panel_before_the_first_analysis():
    assert "adaptive SVD" not in screen(dashboard([]))


def test_svd_panel_at_width_100_one_row_per_layer():
    events = phase1()[:4]  # up to the re-factor: low-rank, r 196
    events.append(analysis(60, "transformer.h.1.attn.c_v", metrics={**METRICS, "principal_alignment": 0.125}))
    text = screen(dashboard(events))
    assert all(len(line) <= 100 for line in text.splitlines())
    svd = panel(text, "adaptive SVD")
    rows = svd.splitlines()
    assert re.fullmatch(r" layer +mode +r +princ +minor +angle +recon +sw +last switch +reason +", rows[0])
    assert re.fullmatch(r" …h\.0\.attn\.c_q +lowrank +196 +0\.451 +0\.892 +0\.012 +4\.1e-03 +1 +40 clobbering risk"
                        r" +continue +", rows[1]), rows[1]
    assert re.fullmatch(r" …h\.1\.attn\.c_v +full +246 +0\.125 +0\.892 +0\.012 +4\.1e-03 +0 +– +continue +", rows[2])
    assert len(rows) == 3
    assert "2 layers · 1 low-rank · 1 switch · analysed at step 60" in text


def test_a_round_trip_shows_the_last_switch_and_both_switches_in_the_events_panels():
    text = screen(dashboard(phase1()), width=100, height=44)
    svd = panel(text, "adaptive SVD")
    assert re.search(r"…h\.0\.attn\.c_q +full +196 +0\.100 +0\.995 +0\.200 +3\.0e-02 +2 +80 recon unsafe +recon unsafe",
                     svd), svd
    events = flat(panel(text, "events"))  # a switch wraps rather than losing its reason
    assert (f"40 {Q} SWITCHED TO LOW-RANK (r=246) - Reason: gradient_clobbering_risk" in events
            and f"80 {Q} SWITCHED TO FULL MATRIX - Reason: reconstruction_unsafe" in events), events
    assert "svd_analysis" not in text  # analyses are the SVD panel's, not the events'
    kinds = panel(text, "events by kind")
    assert re.search(r"svd_mode_switch +…h\.0\.attn\.c_q +2 +80", kinds), kinds


def test_switch_rows_are_kept_per_layer_in_events_by_kind():
    k = "transformer.h.3.attn.c_k"
    dash = dashboard(phase1()[:3] + [
        analysis(40, k, reason="optimal_lowrank_conditions", action="to_lowrank", mode_after="lowrank"),
        SVDModeSwitch(step=40, layer=k, from_mode="full", to_mode="lowrank", r=246,
                      reason="optimal_lowrank_conditions", switches=1)])
    assert sorted(key for kind, key in dash.kinds if kind == "svd_mode_switch") == [Q, k]
    kinds = panel(screen(dash, width=200), "events by kind")
    assert re.search(r"svd_mode_switch +…h\.3\.attn\.c_k +1 +40 +→ lowrank r=246 optimal_lowrank_conditions", kinds)


def test_the_trainers_switch_count_wins_after_a_resume():
    # a resumed run: the layer had switched 4 times before; this session's analysis saw one
    dash = dashboard([analysis(140, reason="gradient_clobbering_risk", action="to_lowrank", mode_after="lowrank"),
                      SVDModeSwitch(step=140, layer=Q, from_mode="full", to_mode="lowrank", r=246,
                                    reason="gradient_clobbering_risk", switches=5)])
    assert dash.svd.rows[Q].switches == 5
    assert re.search(r"lowrank +246 .* 5 +140 clobbering risk", panel(screen(dash), "adaptive SVD"))
    # an analysis that switched without a switch event still counts once, not twice with one
    state = SVDState()
    state.analysis(analysis(40, action="to_lowrank", mode_after="lowrank"))
    assert (state.rows[Q].switches, state.rows[Q].switch_step) == (1, 40)
    state = SVDState()  # and a switch event seen before its analysis is not counted again
    state.switch(SVDModeSwitch(step=40, layer=Q, from_mode="full", to_mode="lowrank", r=246, reason="x", switches=1))
    state.analysis(analysis(40, action="to_lowrank", mode_after="lowrank"))
    assert state.rows[Q].switches == 1


def sixteen_layers() -> list:
    events = []
    for block in range(4):
        for name in ("c_q", "c_k", "c_v", "c_proj"):
            layer = f"transformer.h.{block}.attn.{name}"
            if layer == "transformer.h.2.attn.c_v":
                events += [analysis(60, layer, reason="gradient_clobbering_risk", action="to_lowrank",
                                    mode_after="lowrank"),
                           SVDModeSwitch(step=60, layer=layer, from_mode="full", to_mode="lowrank", r=246,
                                         reason="gradient_clobbering_risk", switches=1)]
            else:
                events.append(analysis(60, layer))
    return events


def test_a_small_terminal_keeps_every_panel_and_the_layer_that_switched():
    for width, height in ((80, 20), (80, 24), (100, 30)):
        text = screen(dashboard(sixteen_layers()), width, height)
        lines = text.splitlines()
        assert len(lines) <= height and all(len(line) <= width for line in lines), (width, height)
        for title in ("loss", "stats", "adaptive SVD", "events", "events by kind"):
            panel(text, title)  # each panel drawn whole, none over another
        svd = panel(text, "adaptive SVD")
        assert "h.2.attn.c_v" in svd and "lowrank" in svd, svd
        shown = svd.count(".attn.")
        assert 1 <= shown < 16 and "16 layers · 1 low-rank" in text
        if len(svd.splitlines()) > 2:
            assert f"… {16 - shown} more layers" in svd
    # the fix the SVD rows needed holds without them: a short top row crops the stats panel and
    # drops the host panel instead of drawing them over the bottom row
    text = screen(dashboard([]), 80, 20)
    for title in ("loss", "stats", "events", "events by kind"):
        panel(text, title)
    assert "host" not in text and "adaptive SVD" not in text
    # a tall one shows them all, in model order
    svd = panel(screen(dashboard(sixteen_layers()), 100, 60), "adaptive SVD")
    names = re.findall(r"h\.\d\.attn\.c_\w+", svd)
    assert names == [f"h.{b}.attn.{n}" for b in range(4) for n in ("c_q", "c_k", "c_v", "c_proj")]


def table(state: SVDState, width: int) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(Panel(SVDTable(list(state.rows.values()))))
    return console.export_text()


def test_the_table_picks_what_fits_the_width():
    state = SVDState()
    for event in phase1()[:2]:
        state.analysis(event)
    wide = table(state, 160)
    assert re.search(rf"{re.escape(Q)} +lowrank .* 40 gradient_clobbering_risk +gradient_clobbering_risk", wide)
    narrow = table(state, 60)
    header = narrow.splitlines()[1]
    assert all(len(line) <= 60 for line in narrow.splitlines())
    assert "mode" in header and "princ" in header and " r " in header
    assert "reason" not in header and "recon" not in header
    tiny = table(state, 34)
    assert all(len(line) <= 34 for line in tiny.splitlines()) and "lowrank" in tiny


def test_shorten_layer_drops_leading_components_first():
    assert shorten_layer(Q, 40) == Q
    assert shorten_layer(Q, 13) == "…h.0.attn.c_q"
    assert shorten_layer(Q, 9) == "…attn.c_q"
    assert shorten_layer(Q, 4) == "…c_q" and shorten_layer(Q, 3) == "…c…"
    pair = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert shorten_layers(pair, 16) == dict(zip(pair, ["…h.0.attn.c_attn", "…h.1.attn.c_attn"], strict=True))
    assert shorten_layers(pair, 14) == dict(zip(pair, ["…0.attn.c_attn", "…1.attn.c_attn"], strict=True))
    assert shorten_layers(pair, 10) == dict(zip(pair, ["…0.attn.c…", "…1.attn.c…"], strict=True))  # never "…attn.c_attn" twice


def test_layers_stay_apart_in_a_tight_table():
    state = SVDState()
    layers = [f"transformer.h.{b}.attn.{n}" for b in range(2) for n in ("c_attn", "c_proj")]
    for layer in layers:  # long cells: every column competes with the layer names
        state.analysis(analysis(10, layer, reason="gradient_clobbering_risk", action="to_lowrank",
                                mode_after="lowrank", r=8, r_after=8))
    for width in (100, 80, 60):
        rows = table(state, width).splitlines()[2:-1]
        shown = [row.split()[1] for row in rows]
        assert len(set(shown)) == 4 and all(".attn.c_" in name for name in shown), (width, shown)


# ------------------------------------------------------------------------------ plain and progress lines


def test_plain_log_prints_each_analysis_and_the_seeds_switch_lines():
    out = io.StringIO()
    log = PlainLog(out)
    for event in phase1():
        log(event)
    assert out.getvalue().splitlines() == [
        f"svd step 20 | {Q} | full | decision initial_svd_computation",
        f"svd step 40 | {Q} | full r=246 | principal_alignment 0.4512 | minor_alignment 0.8924 | "
        "subspace_angle 0.0123 | reconstruction_error 0.004120 | decision gradient_clobbering_risk",
        f"info: step 40: {Q} SWITCHED TO LOW-RANK (r=246) - Reason: gradient_clobbering_risk",
        f"svd step 60 | {Q} | lowrank r=246 | principal_alignment 0.4512 | minor_alignment 0.8924 | "
        "subspace_angle 0.0123 | reconstruction_error 0.004120 | decision continue_current_mode",
        f"svd step 60 | {Q} | Updated r: 246 -> 196",
        f"svd step 80 | {Q} | lowrank r=196 | principal_alignment 0.1000 | minor_alignment 0.9950 | "
        "subspace_angle 0.2000 | reconstruction_error 0.030100 | decision reconstruction_unsafe",
        f"info: step 80: {Q} SWITCHED TO FULL MATRIX - Reason: reconstruction_unsafe",
    ]


def test_the_progress_line_prints_switches_not_analyses():
    console = Console(record=True, width=200, file=io.StringIO(), force_terminal=True)
    view = RichProgress(console)
    for event in phase1():
        view(event)
    view.close()
    text = console.export_text()
    assert f"{Q} SWITCHED TO LOW-RANK (r=246) - Reason: gradient_clobbering_risk" in text
    assert f"{Q} SWITCHED TO FULL MATRIX - Reason: reconstruction_unsafe" in text
    assert "principal_alignment" not in text and "Updated r" not in text and "svd step" not in text


# ------------------------------------------------------------------------------ TensorBoard and events.jsonl


def test_tensorboard_gets_svd_scalars_per_layer(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = TensorBoardWriter(tmp_path / "tb")
    events = phase1() + [analysis(100, metrics={**CALM, "subspace_angle": float("nan")}, r=235)]
    for event in events:
        writer(event)
    writer(RunFinished(status="completed", summary={}))
    tb = EventAccumulator(str(tmp_path / "tb"))
    tb.Reload()

    def series(tag: str) -> list[tuple[int, float]]:
        return [(s.step, round(s.value, 6)) for s in tb.Scalars(f"svd/{Q}/{tag}")]

    tags = set(tb.Tags()["scalars"])
    assert {f"svd/{Q}/{m}" for m in (*METRICS, "mode", "r")} == tags
    assert series("mode") == [(20, 0.0), (40, 1.0), (60, 1.0), (80, 0.0), (100, 0.0)]
    assert series("r") == [(40, 246.0), (60, 196.0), (80, 196.0), (100, 235.0)]  # none before the first decision
    assert series("principal_alignment") == [(40, 0.4512), (60, 0.4512), (80, 0.1), (100, 0.1)]
    assert series("subspace_angle") == [(40, 0.0123), (60, 0.0123), (80, 0.2)]  # NaN is not written
    assert series("reconstruction_error") == [(40, 0.00412), (60, 0.00412), (80, 0.0301), (100, 0.0301)]


def test_events_jsonl_records_analyses_and_switches_and_no_svd_jsonl(tmp_path):
    writer = EventsWriter(tmp_path / "events.jsonl")
    for event in phase1():
        writer(event)
    rows = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["svd_analysis", "svd_analysis", "svd_mode_switch", "svd_analysis",
                                         "svd_analysis", "svd_mode_switch"]
    assert rows[1]["metrics"] == METRICS and rows[1]["action"] == "to_lowrank" and rows[1]["r_after"] == 246
    assert rows[2]["to_mode"] == "lowrank" and rows[2]["switches"] == 1 and rows[2]["layer"] == Q
    assert [p.name for p in tmp_path.iterdir()] == ["events.jsonl"]  # svd.jsonl is the trainer's
