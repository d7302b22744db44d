"""Shared fixtures: isolated caches, the shared real data, a tiny preset, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared(*parts: str) -> Path:
    """A file under ../shared/data (real public data); skips the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests skip, saying why, where no CUDA device is (``pytest -m gpu`` on a CPU
    machine then reports skips, not failures); on a GPU machine they run."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: no CUDA device here")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "lmkit-cache"
    monkeypatch.setenv("LMKIT_CACHE_DIR", str(cache))
    hf_home = tmp_path_factory.getbasetemp() / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf_home / "datasets"))
    gpt2 = SHARED_DATA / "gpt2-tokenizer"
    if gpt2.is_dir():
        monkeypatch.setenv("LMKIT_GPT2_DIR", str(gpt2))
    monkeypatch.delenv("LMKIT_DEBUG", raising=False)
    yield


TINY_PRESET = """\
# A test-sized GPT: 2 layers, 32 wide.
model:
  n_layer: 2
  n_head: 2
  n_embd: 32
  d_ff: 64
  block_size: 32
  pos_encoding: {pos}
  dropout: 0.0
data:
  dataset: arithmetic
  tokenizer: char
  arithmetic: {{n_train: 256, n_val: 32, n_test_flat: 16, n_test_paren: 16}}
training:
  batch_size: 16
  max_steps: {steps}
  lr: 3.0e-3
  warmup_steps: 5
  schedule: cosine
  log_interval: 5
  eval_interval: {eval_interval}
  checkpoint_interval: {ckpt_interval}
  keep_last: 2
  seed: 1
"""


@pytest.fixture
def tiny_preset(tmp_path) -> Path:
    """Path of a tiny arithmetic preset (40 steps; eval every 20; checkpoint every 10)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_PRESET.format(pos="rope", steps=40, eval_interval=20, ckpt_interval=10))
    return path


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m lmkit ARGS`` in a real subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lmkit", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture()
def hub_offline(monkeypatch, tmp_path):
    """The Hugging Face hub forced offline with an empty cache: env vars for any fresh import, the
    already-imported constants for this process, no proxy (a proxy skips the reachability probe)."""
    datasets_config = pytest.importorskip("datasets.config")
    from huggingface_hub import constants

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def poison_training_loss(monkeypatch, bad_forward: int) -> None:
    """Make the training loss NaN in the ``bad_forward``-th training forward with targets
    (1-based; with grad_accum 1 that is optimizer step ``bad_forward``)."""
    import math

    from lmkit.models.gpt import GPT

    original = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kw):
        logits, loss = original(self, idx, targets, **kw)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] == bad_forward:
                loss = loss * math.nan
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
