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
    from lmkit.device import peak_flops

    if peak_flops(torch.device("cuda"))[0] is None:
        pytest.skip(f"no peak FLOP/s known for {torch.cuda.get_device_name()}")
    summary_rows = []
    trainer = Trainer(_config(tmp_path, tiny_preset, "training.device=cuda"), emit=summary_rows.append)
    trainer.run()
    mfus = [e.mfu for e in summary_rows if getattr(e, "kind", "") == "step"]
    assert mfus and all(m is not None and 0 < m < 1 for m in mfus)


def test_bitwise_resume_fp16_restores_the_grad_scaler(tmp_path):
    preset = tmp_path / "fp16.yaml"
    preset.write_text(
        "model: {n_layer: 2, n_head: 2, n_embd: 64, block_size: 32, pos_encoding: rope, dropout: 0.1}\n"
        "data: {dataset: arithmetic, tokenizer: char, arithmetic: {n_train: 256, n_val: 32}}\n"
        "training: {batch_size: 16, grad_accum_steps: 2, max_steps: 24, lr: 3.0e-3, warmup_steps: 4, log_interval: 1,"
        " eval_interval: 8, precision: fp16, device: cuda, seed: 5, deterministic: true}\n"
    )
    env = {}  # training.deterministic sets CUBLAS_WORKSPACE_CONFIG itself
    assert run_cli("train", "--preset", str(preset), "--name", "a", cwd=tmp_path, env=env).returncode == 0
    cut = run_cli("train", "--preset", str(preset), "--name", "b", cwd=tmp_path,
                  env={**env, "LMKIT_TEST_SIGNAL": "19:SIGTERM"})
    assert cut.returncode == 143, cut.stderr
    assert run_cli("resume", "runs/b", cwd=tmp_path, env=env).returncode == 0
    a = torch.load(tmp_path / "runs/a/checkpoints/latest.pt", weights_only=True)
    b = torch.load(tmp_path / "runs/b/checkpoints/latest.pt", weights_only=True)
    assert a["scaler"]["scale"] == b["scaler"]["scale"]
    assert a["scaler"]["_growth_tracker"] == b["scaler"]["_growth_tracker"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def _losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.parametrize(("parallelism", "precision", "compile_flag"),
                         [("fsdp", "--bf16", "--compile"), ("ddp", "--fp16", "--no-compile")])
def test_one_gpu_process_group_trains_and_resumes(tmp_path, tiny_preset, parallelism, precision, compile_flag):
    """`--nproc-per-node 1` + an explicit parallelism: NCCL, and fully_shard then torch.compile with
    fused AdamW on DTensor shards (FSDP, bf16), or DDP with GradScaler (fp16); the losses follow an
    ordinary single-process eager run of the same precision, and a SIGTERM'd run resumes to the
    same losses (the resumed half eager: resume is what is checked, compile is checked above)."""
    common = ("train", "--preset", str(tiny_preset), "--max-steps", "20", precision, "--no-tui")
    one = run_cli(*common, "--name", "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    launched = (*common, "--nproc-per-node", "1", "--set", f"training.parallelism={parallelism}")
    dp = run_cli(*launched, compile_flag, "--name", "dp", cwd=tmp_path)
    assert dp.returncode == 0, dp.stderr[-3000:]
    assert f"1 process ({parallelism.upper()}, NCCL)" in dp.stdout + dp.stderr
    runs = tmp_path / "runs"
    suffix = ".dcp" if parallelism == "fsdp" else ".pt"
    assert (runs / "dp" / "checkpoints" / f"latest{suffix}").exists()
    tol = 2e-2 if precision == "--bf16" else 1e-3  # 16-bit autocast; compiled kernels against eager
    assert _losses(runs / "dp") == pytest.approx(_losses(runs / "one"), abs=tol, rel=0)

    cut = run_cli(*launched, "--name", "cut", cwd=tmp_path, env={"LMKIT_TEST_SIGNAL": "9:SIGTERM"})
    assert cut.returncode == 143, cut.stderr[-3000:]
    more = run_cli("resume", str(runs / "cut"), "--nproc-per-node", "1", "--no-tui", cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert (runs / "cut" / "checkpoints" / f"latest{suffix}").exists()
    assert len(_losses(runs / "cut")) == len(_losses(runs / "one"))
    assert _losses(runs / "cut") == pytest.approx(_losses(runs / "one"), abs=tol, rel=0)


def test_eval_on_cuda_follows_the_runs_tf32_unless_told(tmp_path, tiny_preset):
    run = run_cli("train", "--preset", str(tiny_preset), "--max-steps", "5", "--name", "t", "--device", "cuda",
                  "--no-tui", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = []
    for flag in ((), ("--no-tf32",)):
        out = run_cli("eval", "runs/t", "--task", "arithmetic", "--checkpoint", "latest", "--device", "cuda",
                      "--json", *flag, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        seen.append(json.loads((tmp_path / "runs/t/eval/arithmetic.json").read_text())["tf32"])
    assert seen == [True, False]  # training.tf32 defaults to true
