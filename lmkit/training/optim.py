"""AdamW with decay / no-decay parameter groups.

Weight decay applies to every parameter with two or more dimensions (matmul weights
and embeddings); biases and LayerNorm gains are not decayed (the GPT-2 / nanoGPT
rule; Loshchilov & Hutter 2019 for decoupled weight decay). A tied head is one
parameter, counted once.
"""

from __future__ import annotations

import torch
from torch import nn

from lmkit.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """``[{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0}]``."""
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields a shared (tied) tensor once
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, training: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with ``training.lr``, ``betas``, ``eps`` and ``weight_decay``; the fused
    kernel (one launch for all parameters, and non-finite steps skipped on the device)
    when ``training.fused_optimizer`` says so, by default on CUDA only."""
    fused = training.fused_optimizer if training.fused_optimizer is not None else device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, training.weight_decay),
        lr=training.lr,
        betas=training.betas,
        eps=training.eps,
        fused=fused,
    )
