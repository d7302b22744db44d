"""`lmkit doctor --nproc N [--parallelism ddp|fsdp]`: each GPU's memory with N training processes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from lmkit.analysis import memory as mem
from lmkit.analysis.memory_parallel import group_shapes
from lmkit.cli import app
from lmkit.config import available_presets, build_run_config
from lmkit.models import build_model

ENV = {"COLUMNS": "220"}


def doctor(*args: str):
    return CliRunner().invoke(app, ["doctor", *args], env=ENV)


def report(*args: str) -> dict:
    result = doctor("--json", *args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_json_has_the_per_gpu_estimate_and_a_verdict_per_card():
    one = report("--preset", "gpt2-124m", "--bf16", "--batch-size", "8", "--gpu-memory", "16GiB")
    assert "parallel" not in one  # without --nproc the report is as before
    ddp = report("--preset", "gpt2-124m", "--bf16", "--batch-size", "8", "--gpu-memory", "16GiB", "--nproc", "4")
    fsdp = report("--preset", "gpt2-124m", "--bf16", "--batch-size", "8", "--gpu-memory", "16GiB", "--nproc", "4",
                  "--parallelism", "fsdp")
    assert ddp["memory"] == one["memory"]  # the single-process estimate is unchanged
    d, f = ddp["parallel"], fsdp["parallel"]
    assert (d["parallelism"], d["nproc"], f["parallelism"]) == ("ddp", 4, "fsdp")
    names = {r["name"] for r in d["rows"]}
    assert {"weights", "gradients", "optimizer state", "DDP gradient buckets", "activations"} <= names
    assert {"unsharded parameters (all-gathered)", "reduce-scatter buffers"} <= {r["name"] for r in f["rows"]}
    # a DDP rank holds a whole replica and its buckets: more than one process; FSDP shards the model state
    assert d["total"] > one["memory"]["total"] > f["total"]
    assert d["single_process_total"] == one["memory"]["total"]
    assert f["model_state"] < d["model_state"] / 3
    assert d["global_batch"] == 8 * one["memory"]["grad_accum_steps"] * 4
    card = d["verdicts"][-1]
    assert card["gpu"] == "--gpu-memory 16GiB" and card["verdict"] == mem.verdict(d["total"], 16 * 2**30)


def test_text_shows_the_parts_and_the_verdict():
    result = doctor("--preset", "tiny", "--nproc", "2", "--parallelism", "fsdp", "--gpu-memory", "1GiB")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "Memory per GPU with 2 processes (FSDP): B=32 per process (global batch 64 sequences)" in out
    for row in ("unsharded parameters (all-gathered)", "reduce-scatter buffers", "total per GPU",
                "one process alone", "Verdict per GPU with 2 processes (FSDP)"):
        assert row in out, row


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has GPUs")
def test_without_a_gpu_it_says_what_the_estimate_is_for():
    result = doctor("--preset", "tiny", "--nproc", "8")
    assert result.exit_code == 0, result.stderr
    assert "Memory per GPU with 8 processes (DDP)" in result.stdout
    assert "an estimate for 8 GPU(s) (none visible here): add --gpu-memory" in result.stdout


def test_parallelism_defaults_to_the_preset_setting():
    par = report("--preset", "tiny", "--nproc", "2", "--set", "training.parallelism=fsdp")["parallel"]
    assert par["parallelism"] == "fsdp"


@pytest.mark.parametrize(("args", "message"), [
    (["--preset", "tiny", "--nproc", "0"], "error: --nproc 0: must be at least 1"),
    (["--preset", "tiny", "--nproc", "2", "--parallelism", "zero3"], "error: --parallelism zero3: use ddp or fsdp"),
    (["--preset", "tiny", "--parallelism", "fsdp"], "error: --parallelism: give the number of processes with --nproc"),
    (["--nproc", "2"], "error: --nproc: estimates need a model; add --preset"),
    (["--preset", "nanochat-d4", "--nproc", "2", "--parallelism", "fsdp"], "not supported with FSDP"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = doctor(*args)
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("name", sorted(n for n in available_presets() if build_run_config(n).init_from is None))
def test_fsdp_groups_are_the_models_blocks_and_the_rest(name):
    # the FSDP estimate splits the model into n_layer blocks of count_params' per_layer and a root
    config = build_run_config(name)
    cfg = config.model.model_copy()
    cfg.vocab_size = mem.resolve_vocab_size(config)
    model = build_model(cfg, device="meta")
    block, root = group_shapes(model)
    pc = mem.count_params(cfg)
    assert sum(math.prod(s) for s in block) == pc.per_layer
    assert cfg.n_layer * pc.per_layer + sum(math.prod(s) for s in root) == model.num_params()
