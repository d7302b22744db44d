"""Layers of the Backpack (:mod:`lmkit.models.backpack`; Hewitt et al., ACL 2023, arXiv
2305.16765): the sense network ``C(x) = FF(E x)``, the contextualisation weights' query/key
projection, the sense mixture :func:`mix_senses`, and the KV cache and capture record that
carry what α and the mixture need (``B`` batch, ``T`` new tokens, ``S`` key columns, ``d`` =
``n_embd``, ``k`` = ``n_senses``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmkit.config.backpack import BackpackConfig
from lmkit.models.base import Capture, KVCache
from lmkit.models.gpt_layers import activation_fn, make_norm

__all__ = ["BackpackCapture", "BackpackKVCache", "SenseBlock", "SenseMLP", "SenseNetwork", "SenseWeightNetwork",
           "mix_senses"]


class SenseMLP(nn.Module):
    """``dropout(c_proj(act(c_fc(x))))``: ``(..., d_in) -> (..., d_out)``, hidden ``d_hidden``;
    ``act`` is the config's activation (GELU by default, as the reference's GPT-2 MLP)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, config: BackpackConfig):
        super().__init__()
        self.c_fc = nn.Linear(d_in, d_hidden, bias=config.use_mlp_bias)
        self.c_proj = nn.Linear(d_hidden, d_out, bias=config.use_mlp_bias)
        self.act = activation_fn(config.activation)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class SenseBlock(nn.Module):
    """The sense network's residual block (no token mixing; norms of the config's ``norm`` kind):
    ``r = dropout(x) + residual; r = r + mlp(ln_1(r)); return ln_2(r)``."""

    def __init__(self, config: BackpackConfig):
        super().__init__()
        d = config.n_embd
        self.ln_1 = make_norm(config)
        self.mlp = SenseMLP(d, config.sense_mlp_ratio * d, d, config)
        self.ln_2 = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        residual = self.dropout(x) + residual
        residual = residual + self.mlp(self.ln_1(residual))
        return self.ln_2(residual)


class SenseNetwork(nn.Module):
    """``C(x) = FF(E x)``: word embeddings ``(..., d)`` -> sense vectors ``(..., k, d)``
    (paper §3; no position information, so C depends on the word only)."""

    def __init__(self, config: BackpackConfig):
        super().__init__()
        d, k = config.n_embd, config.n_senses
        self.n_senses = k
        self.dropout = nn.Dropout(config.dropout)
        self.ln = make_norm(config)
        self.block = SenseBlock(config)
        self.final_mlp = SenseMLP(d, config.sense_mlp_ratio * d, k * d, config)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        residual = self.dropout(emb)
        senses = self.final_mlp(self.block(self.ln(residual), residual))
        return senses.unflatten(-1, (self.n_senses, emb.size(-1)))


class SenseWeightNetwork(nn.Module):
    """Queries and keys of the contextualisation weights: ``c_attn`` ``Linear(d, 2d)`` on the
    contextualiser's final hidden states ``(B, T, d)`` -> ``q, k`` ``(B, n_senses, T, d/k)``."""

    def __init__(self, config: BackpackConfig):
        super().__init__()
        self.n_senses = config.n_senses
        self.c_attn = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.use_attn_bias)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, d = h.shape
        q, k = self.c_attn(h).view(B, T, 2, self.n_senses, d // self.n_senses).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2)


def mix_senses(q: torch.Tensor, k: torch.Tensor, senses: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
               is_causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The Backpack sum ``o_i = Σ_ℓ Σ_j α_ℓ[i, j] C(x_j)_ℓ`` with ``α_ℓ = softmax_j(q_ℓ k_ℓ^T / sqrt(d/k))``.

    Args:
        q: ``(B, k, T, d/k)`` queries; k: ``(B, k, S, d/k)`` keys.
        senses: ``(B, k, S, d)`` the sense vectors of the ``S`` key columns.
        attn_mask: bool, broadcastable to ``(B, k, T, S)``, True = may attend (replaces the causal mask).
        is_causal: query ``i`` sees columns ``j <= i + S - T`` (ignored with ``attn_mask``).

    Returns:
        ``(o (B, T, d) in the senses' dtype, α (B, k, T, S) float32)``. The softmax runs in
        float32 (under autocast too); each row of α is non-negative and sums to 1.
    """
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif is_causal:
        T, S = scores.shape[-2:]
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~visible, float("-inf"))
    alpha = torch.softmax(scores.float(), dim=-1)
    return (alpha.to(senses.dtype) @ senses).sum(1), alpha


class BackpackKVCache(KVCache):
    """:class:`~lmkit.models.base.KVCache` with one more slot, index ``n_layer`` of the
    contextualiser: the contextualisation keys ``(B, k, S, d/k)`` (as ``k``) and the sense
    vectors ``(B, k, S, d)`` (as ``v``) of every column, which α and the sum over the prefix
    need. Keys and values may differ in width."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(k.size(0), k.size(1), self.max_len, k.size(3))
            self.v[layer] = v.new_empty(v.size(0), v.size(1), self.max_len, v.size(3))
        kbuf, vbuf = self.k[layer], self.v[layer]
        kbuf[:, :, self.length : end] = k
        vbuf[:, :, self.length : end] = v
        return kbuf[:, :, :end], vbuf[:, :, :end]


@dataclass
class BackpackCapture(Capture):
    """:class:`~lmkit.models.base.Capture` plus, with ``want_alpha``, the last forward's
    ``alpha`` (α, ``(B, k, T, S)`` float32, before :meth:`Backpack.scale_senses` factors) and
    ``senses`` (``(B, k, S, d)``, the sense vectors of the ``S`` columns, after the factors),
    so that ``o = Σ_ℓ alpha[:, ℓ] @ senses[:, ℓ]``."""

    want_alpha: bool = False
    alpha: torch.Tensor | None = None
    senses: torch.Tensor | None = None
