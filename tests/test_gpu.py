"""CUDA paths. Deselected by default; run on a GPU machine with `python -m pytest -m gpu`."""

import json
import math

import pytest
import torch

from lmkit.config import build_run_config
from lmkit.training.loop import Trainer

from conftest import run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _config(tmp_path, preset, *overrides):
    return build_run_config(str(preset), list(overrides), {"out_dir": ("--out-dir", str(tmp_path / "runs"))})


def test_fp16_trains_with_grad_scaler(tmp_path, tiny_preset):
    trainer = Trainer(_config(tmp_path, tiny_preset, "training.precision=fp16", "training.device=cuda"))
    summary = trainer.run()
    assert summary["precision"] == "fp16" and summary["device"].startswith("cuda")
    assert trainer.plan.use_scaler and trainer.scaler.is_enabled()
    assert math.isfinite(summary["final_val_loss"])
    state = torch.load(trainer.run.checkpoint_path("latest"), weights_only=True)
    assert state["scaler"]["scale"] > 0


def test_bf16_with_compile(tmp_path, tiny_preset):
    summary = Trainer(_config(tmp_path, tiny_preset, "training.precision=bf16", "training.compile=true")).run()
    assert summary["precision"] == "bf16" and math.isfinite(summary["final_val_loss"])


def test_gpu_only_runs_on_cuda_and_reports_memory(tmp_path, tiny_preset):
    result = run_cli("train", "--preset", str(tiny_preset), "--gpu-only", "--max-steps", "10", "--name", "g",
                     "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["device"].startswith("cuda")
    rows = [json.loads(line) for line in (tmp_path / "runs" / "g" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert all(r["gpu_mem_gb"] and r["gpu_mem_gb"] > 0 for r in train_rows)


def test_mfu_is_reported_on_a_known_gpu(tmp_path, tiny_preset):
    from lmkit.training.device import peak_flops

    if peak_flops(torch.device("cuda")) is None:
        pytest.skip(f"no peak FLOP/s known for {torch.cuda.get_device_name()}")
    summary_rows = []
    trainer = Trainer(_config(tmp_path, tiny_preset, "training.device=cuda"), emit=summary_rows.append)
    trainer.run()
    mfus = [e.mfu for e in summary_rows if getattr(e, "kind", "") == "step"]
    assert mfus and all(m is not None and 0 < m < 1 for m in mfus)
