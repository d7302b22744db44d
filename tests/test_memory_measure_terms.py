"""``benchmarks/memory_estimate.py --terms`` and :mod:`lmkit.analysis.memory_terms`, on the CPU.

The GPU run gets one shot, so its code is exercised here: the CPU probe (every allocator figure
null) through the exact dry-run command, and :class:`~lmkit.analysis.memory_terms.CudaProbe`
itself with a stand-in for ``torch.cuda`` whose readings say when they were taken.
"""

import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmkit.analysis.memory_terms import (
    PHASES,
    STAT_KEYS,
    STEP_POINTS,
    USAGE_KEYS,
    WORKSPACE_PROBES,
    CudaProbe,
    MemoryProbe,
    measure_terms,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "memory_estimate.py"

# the row schema the calibration reads (the report to the lead lists the same keys)
ROW_KEYS = {"preset", "batch_size", "seq_len", "precision", "grad_checkpointing", "attention", "device", "steps",
            "seconds", "oom", "estimate", "tensors", "measured", "derived", "err_pct", "errors"}
ESTIMATE_KEYS = {"peak_allocated", "peak_phase", "total", "overhead", "overhead_detail", "framework",
                 "saved_for_backward", "model_state", "workspace_bytes", "rows", "per_layer", "phases", "phase_peaks"}
TENSOR_KEYS = {"weights", "buffers", "inputs", "gradients", "optimizer_state", "saved_for_backward"}
MEASURED_KEYS = {"row_start", "build", "after_build", "steps", "usage", "max_allocated", "max_reserved",
                 "stats_peak", "workspace_resident", "phase_peaks"}
ERR_KEYS = {"peak", "forward", "backward", "optimizer", "saved_for_backward", "total"}


def _bench():
    spec = importlib.util.spec_from_file_location("memory_estimate_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeCuda:
    """``torch.cuda``'s functions that CudaProbe calls, with readings that tell when they were taken:
    ``memory_allocated`` counts its calls, the peaks are 1000 × the number of peak resets so far."""

    def __init__(self):
        self.reads = 0
        self.resets = 0
        self.cleared = 0

    def init(self):
        pass

    def get_device_properties(self, device=None):
        return SimpleNamespace(name="fake", major=9, minor=0, total_memory=141 * 2**30)

    def get_allocator_backend(self):
        return "native"

    def synchronize(self, device=None):
        pass

    def empty_cache(self):
        pass

    def memory_allocated(self, device=None):
        self.reads += 1
        return self.reads

    def memory_reserved(self, device=None):
        return 10**9

    def max_memory_allocated(self, device=None):
        return 1000 * self.resets

    def max_memory_reserved(self, device=None):
        return 2000 * self.resets

    def reset_peak_memory_stats(self, device=None):
        self.resets += 1

    def memory_stats(self, device=None):
        return {**dict.fromkeys(STAT_KEYS, 7), "requested_bytes.all.current": 5}

    def mem_get_info(self, device=None):
        return 100, 1000


def test_the_fake_only_stands_in_for_real_torch_cuda_functions():
    # every stand-in is a torch.cuda function of the same name; the ones given a device take one
    for name, fn in inspect.getmembers(FakeCuda, inspect.isfunction):
        if name.startswith("_"):
            continue
        real = getattr(torch.cuda, name)
        assert callable(real), name
        if "device" in inspect.signature(fn).parameters:
            assert "device" in inspect.signature(real).parameters, name
    assert hasattr(torch, "OutOfMemoryError")


class RecordingProbe(MemoryProbe):
    def __init__(self):
        super().__init__("cpu")
        self.calls = []

    def start_row(self):
        self.calls.append("start_row")

    def end_row(self):
        self.calls.append("end_row")

    def allocated(self):
        self.calls.append("allocated")

    def begin_phase(self, name):
        self.calls.append(f"begin {name}")

    def end_phase(self, name):
        self.calls.append(f"end {name}")
        return super().end_phase(name)

    def sync(self):
        self.calls.append("sync")

    def device_usage(self):
        self.calls.append("usage")
        return super().device_usage()


def _pilot():
    from lmkit.analysis.memory import resolve_vocab_size
    from lmkit.config import build_run_config

    cfg = build_run_config("pilot", [])
    model = cfg.model.model_copy()
    model.vocab_size = resolve_vocab_size(cfg)
    return model


def test_probe_is_called_at_every_phase_boundary_in_order():
    probe = RecordingProbe()
    measure_terms(_pilot(), 2, 16, probe=probe, steps=2)
    step = ["allocated", "begin forward", "allocated", "end forward", "begin backward", "allocated", "end backward",
            "begin optimizer", "allocated", "end optimizer", "allocated", "sync"]
    assert probe.calls == ["start_row", "allocated", "begin build", "end build", "allocated", *step, *step,
                           "usage", "sync", "end_row"]


def test_each_reading_lands_in_its_slot_with_the_cuda_probe():
    # run CudaProbe's own code on CPU tensors: its readings must land where measure_terms files them
    fake = FakeCuda()
    probe = CudaProbe("cpu", cuda=fake, clear_workspaces=lambda: setattr(fake, "cleared", fake.cleared + 1))
    out = measure_terms(_pilot(), 2, 16, probe=probe, steps=3)
    readings = [s["allocated"][p] for s in out["steps"] for p in STEP_POINTS]
    assert readings == sorted(readings) and len(set(readings)) == len(readings)  # in STEP_POINTS order, step by step
    # one peak reset per phase (start_row, build, then 3 per step): each phase's peak is its own
    peaks = [s["peaks"][p]["peak_allocated"] for s in out["steps"] for p in PHASES]
    assert peaks == [1000 * (3 + k) for k in range(9)]
    assert out["build"]["peak_allocated"] == 2000
    assert out["max_allocated"] == 11000 and out["max_reserved"] == 22000
    assert out["stats_peak"] == dict.fromkeys(STAT_KEYS, 7)
    assert fake.cleared == 2  # the workspaces cleared at the start and at the end of the row
    last = out["steps"][-1]["allocated"]["after_zero_grad"]
    t = out["tensors"]
    assert out["workspace_resident"] == last - t["weights"] - t["buffers"] - t["optimizer_state"] - t["inputs"]


def test_cuda_probe_process_readings_with_the_fake():
    fake = FakeCuda()
    probe = CudaProbe("cpu", cuda=fake, clear_workspaces=lambda: None)
    setup = probe.setup()
    assert setup["device_name"] == "fake" and setup["capability"] == "9.0" and setup["clear_workspaces_api"]
    ws = probe.workspaces()
    assert set(ws) == {*WORKSPACE_PROBES, "all_resident"}
    mm = ws["mm_fp32"]
    assert mm["output_bytes"] == 1024 * 768 * 4 and mm["requested_delta"] == 0 and mm["workspace"] == -mm["output_bytes"]
    usage = probe.device_usage()
    assert set(usage) == set(USAGE_KEYS) and usage["cudart_device_used"] == 900 and usage["reserved"] == 10**9
    cpu = MemoryProbe("cpu")  # the process section has the same keys, null on the CPU
    assert _keys(cpu.setup()) == _keys(setup) and _keys(cpu.workspaces()) == _keys(ws)
    assert _keys(cpu.device_usage()) == _keys(usage) and cpu.setup()["device_name"] is None


def _keys(obj):
    """The key tree of a JSON value (lists: the union of their items' trees)."""
    if isinstance(obj, dict):
        return {k: _keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        trees = [_keys(v) for v in obj]
        return ("list", json.dumps(trees[0], sort_keys=True) if trees else None)
    return None


def test_cpu_and_cuda_probes_give_rows_with_the_same_keys():
    bench = _bench()
    fake = FakeCuda()
    cpu_row = bench.terms_row(MemoryProbe("cpu"), "pilot", 2, 16, "fp32", False, 2)
    cuda_row = bench.terms_row(CudaProbe("cpu", cuda=fake, clear_workspaces=lambda: None), "pilot", 2, 16, "fp32",
                               False, 2)
    assert cpu_row["errors"] == [] and cuda_row["errors"] == []
    assert set(cpu_row) == ROW_KEYS and set(cpu_row["estimate"]) == ESTIMATE_KEYS
    assert set(cpu_row["measured"]) == MEASURED_KEYS and set(cpu_row["err_pct"]) == ERR_KEYS
    assert _keys(cpu_row["measured"]) == _keys(cuda_row["measured"])
    assert _keys(cpu_row["derived"]) == _keys(cuda_row["derived"])
    assert cpu_row["measured"]["max_allocated"] is None and cuda_row["measured"]["max_allocated"] == 8000
    assert cuda_row["err_pct"]["peak"] is not None and cpu_row["err_pct"]["peak"] is None


def test_a_failing_row_is_recorded_and_the_run_goes_on(monkeypatch):
    bench = _bench()

    class Broken(MemoryProbe):
        def end_phase(self, name):
            raise RuntimeError("no such counter")

    row = bench.terms_row(Broken("cpu"), "pilot", 2, 16, "fp32", False, 2)
    assert row["errors"] == ["RuntimeError: no such counter"] and row["measured"] is None
    assert row["estimate"]["peak_allocated"] > 0


def test_sigterm_prints_the_rows_done(monkeypatch, capsys):
    bench = _bench()

    def run_terms(doc, probe, cases, steps, log, max_seconds):
        doc["rows"].append({"preset": "done"})
        raise bench._Stopped  # what the SIGTERM handler raises

    monkeypatch.setattr(bench, "run_terms", run_terms)
    bench.terms_main(SimpleNamespace(dry_run=True, device="cpu", steps=2, json=True, max_seconds=0), ["fp32"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["complete"] is False and doc["rows"] == [{"preset": "done"}]


def test_the_cuda_branch_of_the_command_with_the_fake(monkeypatch, capsys):
    # --device cuda --terms --json as the GPU script calls it, CudaProbe on CPU tensors, one pilot row
    import lmkit.analysis.memory_terms as terms

    bench = _bench()
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(terms, "probe_for", lambda device: CudaProbe("cpu", cuda=fake, clear_workspaces=lambda: None))
    monkeypatch.setattr(bench, "CUDA_CASES", [("pilot", 2, True)])
    monkeypatch.setattr(sys, "argv", ["memory_estimate.py", "--device", "cuda", "--terms", "--json", "--steps", "2"])
    bench.main()
    doc = json.loads(capsys.readouterr().out)
    assert doc["complete"] and doc["device"] == "cuda" and not doc["dry_run"]
    assert [(r["precision"], r["grad_checkpointing"], r["seq_len"]) for r in doc["rows"]] == [
        ("fp32", True, 32), ("bf16", True, 32)]
    assert all(r["errors"] == [] for r in doc["rows"])
    # 8 peak resets a row (start, build, 3 phases x 2 steps): each row's peak is its own last phase's
    assert [r["measured"]["max_allocated"] for r in doc["rows"]] == [8000, 16000]
    assert doc["process"]["setup"]["device_name"] == "fake" and doc["process"]["workspaces"]["all_resident"] is not None


def test_max_seconds_skips_the_rows_left():
    bench = _bench()
    doc = {"process": {"errors": []}, "rows": [], "skipped": []}
    bench.run_terms(doc, MemoryProbe("cpu"), bench.DRY_RUN_CASES, 2, lambda msg: None, max_seconds=1e-9)
    assert doc["rows"] == [] and doc["skipped"] == [list(c) for c in bench.DRY_RUN_CASES]
    assert set(doc["process"]) >= {"setup", "start", "workspaces", "end"}


@pytest.fixture(scope="module")
def dry_run():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--terms", "--dry-run", "--json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_dry_run_command_gives_every_key(dry_run):
    assert dry_run["complete"] and dry_run["mode"] == "terms" and dry_run["dry_run"]
    assert set(dry_run["process"]) == {"setup", "start", "workspaces", "end", "cuda_context_end",
                                       "cuda_context_end_cudart", "errors"}
    assert set(dry_run) == {"mode", "device", "dry_run", "complete", "seconds", "steps", "process", "rows", "skipped"}
    assert len(dry_run["rows"]) == 2
    for row in dry_run["rows"]:
        assert row["errors"] == []
        assert set(row) == ROW_KEYS and set(row["estimate"]) == ESTIMATE_KEYS
        assert set(row["tensors"]) == TENSOR_KEYS and set(row["measured"]) == MEASURED_KEYS
        assert set(row["err_pct"]) == ERR_KEYS
        assert [s["step"] for s in row["measured"]["steps"]] == [1, 2, 3]
        for s in row["measured"]["steps"]:
            assert set(s["allocated"]) == set(STEP_POINTS) and set(s["peaks"]) == set(PHASES)
            assert all(v is None for v in s["allocated"].values())
            assert set(s["peaks"]["backward"]["stats"]) == set(STAT_KEYS)
        assert row["measured"]["max_allocated"] is None and row["err_pct"]["peak"] is None


def test_dry_run_terms_against_independent_counts(dry_run):
    from lmkit.analysis.memory import count_params

    bench = _bench()
    for row in dry_run["rows"]:
        cfg = bench.model_config(row["preset"], [])
        P = count_params(cfg).total
        t = row["tensors"]
        assert t["weights"] == 4 * P and t["gradients"] == 4 * P  # fp32 master weights and .grad
        assert 8 * P <= t["optimizer_state"] <= 8 * P + 8 * 1000  # exp_avg, exp_avg_sq (+ fused AdamW's step counts)
        # the saved tensors, counted by the hooks, against the estimator's arithmetic (tests/test_memory.py: ±10%)
        assert abs(row["err_pct"]["saved_for_backward"]) < 10
        est = row["estimate"]
        assert max(est["phase_peaks"].values()) == est["peak_allocated"]  # the walk's largest phase is the peak
        assert est["phases"][0]["phase"].startswith("forward") and est["phases"][-1]["phase"] == "optimizer step"
