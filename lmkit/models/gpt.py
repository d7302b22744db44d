"""GPT: a pre-LayerNorm decoder-only Transformer (GPT-2 / nanoGPT layout).

Module names follow nanoGPT and Hugging Face GPT-2 (``transformer.wte``,
``transformer.h.N.attn.c_attn`` ...), so a state dict maps onto ``GPT2LMHeadModel``
by transposing the four Conv1D weights. Weights of ``nn.Linear`` are ``(out, in)``.

Enough knobs reproduce the parameter counts of every preset: learned or rotary
positions, biases switched per part (``bias``/``attn_bias``/``mlp_bias``), exact or
tanh GELU, tied or untied head, any ``d_ff``.

References:
    Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2:
    pre-LN blocks, residual projections initialised with std 0.02/sqrt(2 * n_layer)).
    Su et al. 2021, "RoFormer" (arXiv 2104.09864), eq. 34 -- rotary positions; we use the
    "rotate half" arrangement of GPT-NeoX / HF Llama so the model exports to GPT-NeoX.
    Kaplan et al. 2020, "Scaling Laws", Table 1 and Chowdhery et al. 2022 (PaLM),
    Appendix B -- training FLOPs per token 6N + 12 * n_layer * n_embd * T.

Inference extras (used by :mod:`lmkit.evaluation.generate`, never by training): a
:class:`KVCache` of every layer's keys and values, explicit ``position_ids`` (so a
left-padded row gets the positions it would have alone) and a boolean ``attn_mask``.
Without them ``forward`` runs exactly the training computation (``is_causal=True``,
positions ``0..T-1``), so training numerics do not change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmkit.config import ModelConfig

IGNORE_INDEX = -100


class KVCache:
    """Keys and values of every layer for incremental decoding.

    Per layer two buffers of shape ``(B, n_head, max_len, head_dim)`` are allocated on the
    first write (dtype and device of the keys written). ``length`` is the number of
    positions (columns) already stored; :meth:`GPT.forward` writes the ``T`` new columns
    ``length..length+T-1`` in every layer and then advances ``length`` by ``T``. Columns
    are buffer slots, not token positions: with left padding a row's position is given by
    ``position_ids`` and its padding columns are hidden by ``attn_mask``.
    """

    def __init__(self, n_layer: int, max_len: int):
        self.n_layer = n_layer
        self.max_len = max_len
        self.length = 0
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` ``(B, n_head, T, head_dim)`` after the cached columns of ``layer``;
        return all keys and values so far, ``(B, n_head, length + T, head_dim)`` each.

        Raises:
            ValueError: the buffer would overflow ``max_len``.
        """
        B, H, T, D = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(B, H, self.max_len, D)
            self.v[layer] = v.new_empty(B, H, self.max_len, D)
        kbuf, vbuf = self.k[layer], self.v[layer]
        kbuf[:, :, self.length : end] = k
        vbuf[:, :, self.length : end] = v
        return kbuf[:, :, :end], vbuf[:, :, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more columns as written (called once per forward, after all layers)."""
        self.length += n

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (int64 indices), e.g. after some rows finished."""
        for i in range(self.n_layer):
            if self.k[i] is not None:
                self.k[i] = self.k[i].index_select(0, rows)
                self.v[i] = self.v[i].index_select(0, rows)


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for rotary position embeddings (RoFormer eq. 34, rotate-half form).

    ``inv_freq[i] = theta ** (-2i / head_dim)`` for ``i < head_dim / 2``; position ``t``
    rotates the pair ``(x[i], x[i + head_dim/2])`` by the angle ``t * inv_freq[i]``.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 tables for positions ``0..seq_len-1``, each ``(seq_len, head_dim)``."""
        return self.cos[:seq_len], self.sin[:seq_len]

    def at(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 tables for explicit positions ``(B, T)``: each ``(B, 1, T, head_dim)``
        (broadcast over heads)."""
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, n_head, T, head_dim)`` by tables of shape ``(T, head_dim)``
    (or ``(B, 1, T, head_dim)`` for per-row positions).

    The tables are cast to ``x.dtype`` so that under autocast q, k and v share a dtype.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``.

    Input and output ``(B, T, n_embd)``. ``c_attn`` holds Q, K and V stacked along the
    output dimension (``[q | k | v]``, heads contiguous within each).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.n_embd
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(d, 3 * d, bias=config.use_attn_bias)
        self.c_proj = nn.Linear(d, d, bias=config.use_attn_bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                attn_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """``x`` ``(B, T, n_embd)`` -> ``(B, T, n_embd)``.

        ``attn_mask`` (bool, ``(B, 1, T, S)``, True = may attend; ``S`` = cached columns + T)
        replaces the causal mask; with ``kv_cache`` the new keys/values are appended to
        layer ``layer``'s cache and attention runs over all cached columns.
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        if kv_cache is None and attn_mask is None:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            past = 0
            if kv_cache is not None:
                past = kv_cache.length
                k, v = kv_cache.update(layer, k, v)
            if attn_mask is None and T > 1:
                # causal over the new columns, everything cached before them visible
                cols = torch.arange(past + T, device=x.device)
                rows = torch.arange(past, past + T, device=x.device)
                attn_mask = cols[None, :] <= rows[:, None]
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """``c_proj(GELU(c_fc(x)))`` with hidden size ``d_ff``; input/output ``(B, T, n_embd)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ff_dim, bias=config.use_mlp_bias)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.c_proj = nn.Linear(config.ff_dim, config.n_embd, bias=config.use_mlp_bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-LN residual block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                attn_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, attn_mask, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only language model.

    ``forward(idx)`` maps token ids ``(B, T)`` (``T <= block_size``) to logits
    ``(B, T, vocab_size)``; with ``targets`` ``(B, T)`` (``-100`` = ignored) it also
    returns the mean cross-entropy in nats per target token.

    Attributes:
        grad_checkpointing: recompute each block in backward instead of storing its
            activations (``torch.utils.checkpoint``), trading ~30% more compute for
            memory that no longer grows with ``n_layer``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("config.vocab_size must be set")
        self.config = config
        d = config.n_embd
        modules: dict[str, nn.Module] = {"wte": nn.Embedding(config.vocab_size, d)}
        if config.pos_encoding == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, d)
        modules["drop"] = nn.Dropout(config.dropout)
        modules["h"] = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        modules["ln_f"] = nn.LayerNorm(d, eps=config.layer_norm_eps, bias=config.bias)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.block_size, config.rope_theta)
            if config.pos_encoding == "rope"
            else None
        )
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) for every Linear and Embedding weight, zero biases, unit LayerNorms;
        residual output projections (``*.c_proj.weight``) get ``init_std / sqrt(2 * n_layer)``
        (GPT-2 paper, section 2.3)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=resid_std)

    def num_params(self, *, exclude_position_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_position_embeddings and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: ``6 N + 12 * n_layer * n_embd * T``.

        ``N`` counts parameters without position embeddings; ``T`` is the attention
        context (``block_size`` unless given). 6N covers the forward (2N) and backward
        (4N) matmuls; the second term the attention scores and weighted sums
        (Kaplan et al. 2020 Table 1; PaLM Appendix B). Used for MFU.
        """
        t = self.config.block_size if seq_len is None else seq_len
        n = self.num_params(exclude_position_embeddings=True)
        return 6.0 * n + 12.0 * self.config.n_layer * self.config.n_embd * t

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        last_only: bool = False,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(B, T, V)`` (``(B, 1, V)`` with ``last_only``) and the loss or ``None``.

        Inference-only arguments (training passes none of them):

        - ``position_ids`` ``(B, T)`` int64: each token's position (default
          ``kv_cache.length + 0..T-1``, or ``0..T-1``); the caller keeps them below
          ``block_size``.
        - ``attn_mask`` ``(B, 1, T, S)`` bool, True where a query may attend to a key;
          ``S = kv_cache.length + T`` (or ``T``). Default: causal.
        - ``kv_cache``: keys/values of earlier columns; this call appends its ``T``
          columns to it (see :class:`KVCache`).

        Raises:
            ValueError: when ``T > block_size`` (or the cache would pass it without explicit
                ``position_ids``).
        """
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        if T > self.config.block_size or (position_ids is None and past + T > self.config.block_size):
            raise ValueError(f"sequence length {past + T} exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)
        if position_ids is None and past:
            position_ids = torch.arange(past, past + T, device=idx.device).expand(B, T)
        if "wpe" in self.transformer:
            pos = torch.arange(T, device=idx.device) if position_ids is None else position_ids
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        rope = None
        if self.rotary is not None:
            rope = self.rotary(T) if position_ids is None else self.rotary.at(position_ids)
        for i, block in enumerate(self.transformer.h):
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, rope, attn_mask, kv_cache, i, use_reentrant=False)
            else:
                x = block(x, rope, attn_mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.transformer.ln_f(x)
        if last_only and targets is None:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return logits, loss
