"""The parts :class:`lmkit.models.gpt.GPT` switches with its nanochat options
(:class:`lmkit.config.GPTConfig`: ``norm``, ``norm_affine``, ``activation: relu2``,
``logit_softcap``, ``init: nanochat``).

Source: karpathy/nanochat ``nanochat/gpt.py`` (the version of November 2025, which the
adaptive-SVD fork of nanochat trained at depth 4): ``norm(x) = F.rms_norm(x, (x.size(-1),))``
without weights, ``F.relu(x).square()`` in the MLP, ``softcap * tanh(logits / softcap)`` with
``softcap = 15``, and ``_init_weights`` / ``init_weights``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.config import GPTConfig

__all__ = ["SoftcapLinear", "activation_fn", "init_gpt2", "init_nanochat", "make_norm", "relu2"]


def make_norm(config: GPTConfig, dim: int | None = None) -> nn.Module:
    """The norm ``config`` asks for over the last ``dim`` (default ``n_embd``) features.

    ``layernorm``: ``nn.LayerNorm(dim, eps=layer_norm_eps, bias=bias)`` -- exactly what the GPT
    family always built -- or, with ``norm_affine: false``, without gain and bias.
    ``rmsnorm``: ``nn.RMSNorm(dim, eps=layer_norm_eps)`` (``y = x / sqrt(mean(x²) + eps) · g``;
    Zhang & Sennrich 2019), without the gain ``g`` when ``norm_affine`` is false: then it is
    nanochat's parameter-free ``F.rms_norm(x, (dim,))``.
    """
    d = config.n_embd if dim is None else dim
    if config.norm == "rmsnorm":
        return nn.RMSNorm(d, eps=config.layer_norm_eps, elementwise_affine=config.norm_affine)
    if config.norm_affine:
        return nn.LayerNorm(d, eps=config.layer_norm_eps, bias=config.bias)
    return nn.LayerNorm(d, eps=config.layer_norm_eps, elementwise_affine=False)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """``relu(x)²`` (So et al. 2021, "Primer", section 3; nanochat's MLP activation)."""
    return F.relu(x).square()


def activation_fn(name: str):
    """``x -> activation(x)`` for ``GPTConfig.activation``: exact GELU, tanh GELU or ReLU².

    Raises:
        ValueError: unknown name.
    """
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu2":
        return relu2
    raise ValueError(f"unknown activation {name!r} (known: gelu, gelu_tanh, relu2)")


class SoftcapLinear(nn.Linear):
    """``nn.Linear`` whose output is soft-capped: ``c · tanh(x Wᵀ / c)``, computed in float32.

    The output head of a GPT with ``logit_softcap: c``; its state dict is an ``nn.Linear``'s
    (``weight``), so checkpoints and ``output_head()`` users see an ordinary head whose
    logits lie in ``(-c, c)``. nanochat (``GPT.forward``) caps with ``c = 15`` before the
    cross-entropy, and casts the logits to float32 first (its commit 16788ee); Gemma 2 uses the
    same form (Gemma Team 2024, section 2).
    """

    def __init__(self, in_features: int, out_features: int, softcap: float, bias: bool = False, **kw):
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.softcap = float(softcap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.softcap
        return c * torch.tanh(super().forward(x).float() / c)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, softcap={self.softcap}"


@torch.no_grad()
def init_gpt2(model: nn.Module, std: float, n_layer: int) -> None:
    """GPT-2's initialisation over ``model`` (Radford et al. 2019, section 2.3; nanoGPT):
    ``N(0, std)`` for every ``nn.Linear`` and ``nn.Embedding`` weight, zero biases, unit norm
    gains and zero norm biases, then every ``*.c_proj.weight`` (the residual output
    projections) ``N(0, std / sqrt(2 * n_layer))``."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    resid_std = std / math.sqrt(2 * n_layer)
    for name, param in model.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(param, mean=0.0, std=resid_std)


def init_nanochat(model: nn.Module, tied: bool) -> None:
    """nanochat's initialisation (``GPT.init_weights`` of November 2025) over ``model``.

    Every ``nn.Linear``: ``N(0, std)`` with ``std = 1/sqrt(fan_in) · min(1, sqrt(fan_out /
    fan_in))`` (Yang et al. 2023, arXiv 2310.17813, as nanochat cites), biases zero; every
    ``nn.Embedding``: ``N(0, 1)``; norm gains one and biases zero; then ``lm_head`` and every
    ``*.c_proj.weight`` zero. With a tied head the shared matrix keeps the embedding's
    ``N(0, 1)`` (zeroing it would zero the embedding). Modules are visited in
    ``model.modules()`` order, so the random draws differ from nanochat's ``apply`` order: the
    distribution is nanochat's, the numbers are not.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fan_out, fan_in = module.weight.shape
            std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    if not tied:
        nn.init.zeros_(model.lm_head.weight)
    for name, param in model.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.zeros_(param)
