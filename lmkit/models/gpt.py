"""GPT: a pre-LayerNorm decoder-only Transformer (GPT-2 / nanoGPT layout).

Module names follow nanoGPT and Hugging Face GPT-2 (``transformer.wte``,
``transformer.h.N.attn.c_attn`` ...), so a state dict maps onto ``GPT2LMHeadModel``
by transposing the four Conv1D weights. Weights of ``nn.Linear`` are ``(out, in)``.

Enough knobs reproduce the parameter counts of every preset: learned or rotary
positions, biases switched per part (``bias``/``attn_bias``/``mlp_bias``), exact or
tanh GELU, tied or untied head, any ``d_ff``; and nanochat's GPT (karpathy/nanochat
``nanochat/gpt.py``, the ``nanochat-d4`` preset) as options of the same family: RMSNorm
without weights, QK-norm, a norm after the embedding, ReLU², separate ``c_q``/``c_k``/``c_v``,
a tanh logit soft-cap and nanochat's init (:class:`~lmkit.config.GPTConfig`,
:mod:`lmkit.models.gpt_layers`).

Rotary sign: nanochat's ``apply_rotary_emb`` computes ``y1 = x1 cos + x2 sin``,
``y2 = -x1 sin + x2 cos``, a rotation by ``-θ`` (its own comment says so), where lmkit's rotate-half
form rotates by ``+θ``. The two are the same model class -- negating the second half of each
head's rows of ``c_q`` and ``c_k`` maps one onto the other (QK-norm is sign-blind) -- but a
nanochat checkpoint would need that change to compute the same logits here.

References:
    Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2:
    pre-LN blocks, residual projections initialised with std 0.02/sqrt(2 * n_layer)).
    Su et al. 2021, "RoFormer" (arXiv 2104.09864), eq. 34 -- rotary positions; we use the
    "rotate half" arrangement of GPT-NeoX / HF Llama so the model exports to GPT-NeoX.
    Kaplan et al. 2020, "Scaling Laws", Table 1 and Chowdhery et al. 2022 (PaLM),
    Appendix B -- training FLOPs per token 6N + 12 * n_layer * n_embd * T, N the weights a
    token multiplies (see :meth:`GPT.flops_per_token`).

:class:`GPT` implements the model interface :class:`lmkit.models.base.LanguageModel`; code
outside ``lmkit/models`` uses that interface, never these module names.

Inference extras (used by :mod:`lmkit.evaluation.generate`, never by training): a
:class:`~lmkit.models.base.KVCache` of every layer's keys and values
(:meth:`GPT.new_kv_cache`), explicit ``position_ids`` (so a left-padded row gets the
positions it would have alone) and a boolean ``attn_mask``. Without them ``forward`` runs
exactly the training computation (``is_causal=True``, positions ``0..T-1``), so training
numerics do not change. Analyses: :meth:`GPT.capture` records per-head outputs and (through
an exact math path) attention probabilities.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmkit.config import GPTConfig
from lmkit.data.batching import IGNORE_INDEX
from lmkit.models.base import Capture, HeadEdit, KVCache, LanguageModel, math_attention
from lmkit.models.gpt_layers import SoftcapLinear, activation_fn, init_gpt2, init_nanochat, make_norm
from lmkit.models.loss import cross_entropy

ModelConfig = GPTConfig

__all__ = ["GPT", "gpt_trunk", "IGNORE_INDEX", "KVCache", "RotaryEmbedding", "apply_rotary", "math_attention"]


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
    output dimension (``[q | k | v]``, heads contiguous within each); with ``qkv: separate``
    they are three Linears ``c_q``, ``c_k``, ``c_v`` (nanochat). With ``qk_norm`` each head's
    q and k are RMS-normalised over ``head_dim`` after the rotary rotation (before the cache
    and the attention), without weights, as nanochat does. ``capture`` (set by
    :meth:`GPT.capture`, else ``None``) records the per-head outputs ``(B, n_head, T,
    head_dim)`` before ``c_proj`` and, when asked, the attention probabilities, computed by
    :func:`math_attention` instead of the fused kernel.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        d = config.n_embd
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.separate_qkv = config.qkv == "separate"
        if self.separate_qkv:
            self.c_q = nn.Linear(d, d, bias=config.use_attn_bias)
            self.c_k = nn.Linear(d, d, bias=config.use_attn_bias)
            self.c_v = nn.Linear(d, d, bias=config.use_attn_bias)
        else:
            self.c_attn = nn.Linear(d, 3 * d, bias=config.use_attn_bias)
        self.qk_norm_eps = config.layer_norm_eps if config.qk_norm else None
        self.c_proj = nn.Linear(d, d, bias=config.use_attn_bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.capture: Capture | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                attn_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """``x`` ``(B, T, n_embd)`` -> ``(B, T, n_embd)``.

        ``attn_mask`` (bool, ``(B, 1, T, S)``, True = may attend; ``S`` = cached columns + T)
        replaces the causal mask; with ``kv_cache`` the new keys/values are appended to
        layer ``layer``'s cache and attention runs over all cached columns.
        """
        B, T, C = x.shape
        if self.separate_qkv:
            q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        else:
            q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        if self.qk_norm_eps is not None:
            q = F.rms_norm(q, (self.head_dim,), eps=self.qk_norm_eps)
            k = F.rms_norm(k, (self.head_dim,), eps=self.qk_norm_eps)
        causal = kv_cache is None and attn_mask is None
        if not causal:
            past = 0
            if kv_cache is not None:
                past = kv_cache.length
                k, v = kv_cache.update(layer, k, v)
            if attn_mask is None and T > 1:
                # causal over the new columns, everything cached before them visible
                cols = torch.arange(past + T, device=x.device)
                rows = torch.arange(past, past + T, device=x.device)
                attn_mask = cols[None, :] <= rows[:, None]
        dropout_p = self.dropout if self.training else 0.0
        cap = self.capture
        probs = None
        if cap is not None and cap.want_probs:
            y, probs = math_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, dropout_p=dropout_p)
        elif causal:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        if cap is not None:
            if cap.edit_heads is not None:
                y = cap.edit_heads(layer, y)
            cap.record(layer, y, probs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """``c_proj(act(c_fc(x)))`` with hidden size ``d_ff``; input/output ``(B, T, n_embd)``;
    ``act`` is GELU (exact or tanh) or ReLU² (``config.activation``)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ff_dim, bias=config.use_mlp_bias)
        self.act = activation_fn(config.activation)
        self.c_proj = nn.Linear(config.ff_dim, config.n_embd, bias=config.use_mlp_bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` (the norms are
    LayerNorm or RMSNorm, :func:`~lmkit.models.gpt_layers.make_norm`)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                attn_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, attn_mask, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


def gpt_trunk(config: GPTConfig) -> nn.ModuleDict:
    """The decoder trunk, ``transformer``: ``wte`` ``(V, d)``, ``wpe`` ``(block_size, d)`` with
    learned positions, ``ln_emb`` with ``embed_norm``, ``drop``, ``h`` (``n_layer`` :class:`Block`)
    and ``ln_f``, built in that order (module creation draws from the RNG: the order is part of
    a seeded model's weights). Shared by the families built on GPT blocks."""
    d = config.n_embd
    modules: dict[str, nn.Module] = {"wte": nn.Embedding(config.vocab_size, d)}
    if config.pos_encoding == "learned":
        modules["wpe"] = nn.Embedding(config.block_size, d)
    if config.embed_norm:
        modules["ln_emb"] = make_norm(config)
    modules["drop"] = nn.Dropout(config.dropout)
    modules["h"] = nn.ModuleList(Block(config) for _ in range(config.n_layer))
    modules["ln_f"] = make_norm(config)
    return nn.ModuleDict(modules)


class GPT(LanguageModel):
    """Decoder-only language model (the ``gpt`` family); the interface is
    :class:`~lmkit.models.base.LanguageModel`.

    ``forward(idx)`` maps token ids ``(B, T)`` (``T <= block_size``) to logits
    ``(B, T, vocab_size)``; with ``targets`` ``(B, T)`` (``-100`` = ignored) it returns
    ``(None, loss)``, the mean cross-entropy in nats per target token, without keeping the
    logits.

    Attributes:
        grad_checkpointing: recompute each block in backward instead of storing its
            activations (``torch.utils.checkpoint``), trading ~30% more compute for memory
            that no longer grows with ``n_layer``.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("config.vocab_size must be set")
        self.config = config
        d = config.n_embd
        self.transformer = gpt_trunk(config)
        if config.logit_softcap is None:
            self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        else:
            self.lm_head = SoftcapLinear(d, config.vocab_size, config.logit_softcap, bias=False)
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
        """``init: gpt2``: N(0, init_std) for every Linear and Embedding weight, zero biases, unit
        norms; residual output projections (``*.c_proj.weight``) get ``init_std / sqrt(2 *
        n_layer)`` (GPT-2 paper, section 2.3). ``init: nanochat``:
        :func:`~lmkit.models.gpt_layers.init_nanochat`."""
        if self.config.init == "nanochat":
            init_nanochat(self, tied=self.config.tie_embeddings)
            return
        init_gpt2(self, self.config.init_std, self.config.n_layer)

    # --- the interface: accessors ------------------------------------------------------

    def output_head(self) -> nn.Module:
        """``lm_head``: ``(..., n_embd) -> (..., vocab_size)``, no bias; with ``logit_softcap``
        a :class:`~lmkit.models.gpt_layers.SoftcapLinear`, so its logits are capped."""
        return self.lm_head

    def input_embedding(self) -> nn.Embedding:
        """``transformer.wte``, ``(vocab_size, n_embd)``."""
        return self.transformer.wte

    def position_embedding(self) -> nn.Embedding | None:
        """``transformer.wpe`` with learned positions, else ``None``."""
        return self.transformer.wpe if "wpe" in self.transformer else None

    def target_modules(self, kind: str = "all") -> dict[str, nn.Module]:
        """``transformer.h.{i}.attn.c_attn`` / ``.attn.c_proj`` (``attention``; with ``qkv:
        separate`` ``.attn.c_q`` / ``.attn.c_k`` / ``.attn.c_v`` / ``.attn.c_proj``),
        ``transformer.h.{i}.mlp.c_fc`` / ``.mlp.c_proj`` (``mlp``), ``lm_head`` (``head``), in
        layer order; see :meth:`LanguageModel.target_modules`."""
        self._check_kind(kind)
        out: dict[str, nn.Module] = {}
        if kind != "head":
            for i, block in enumerate(self.transformer.h):
                prefix = f"transformer.h.{i}."
                if kind != "mlp":
                    for name in (("c_q", "c_k", "c_v") if block.attn.separate_qkv else ("c_attn",)):
                        out[prefix + "attn." + name] = getattr(block.attn, name)
                    out[prefix + "attn.c_proj"] = block.attn.c_proj
                if kind != "attention":
                    out[prefix + "mlp.c_fc"] = block.mlp.c_fc
                    out[prefix + "mlp.c_proj"] = block.mlp.c_proj
        if kind in ("head", "all"):
            out["lm_head"] = self.lm_head
        return out

    def _attention_modules(self) -> Iterator[CausalSelfAttention]:
        return (m for m in self.modules() if isinstance(m, CausalSelfAttention))

    # --- the interface: sizes ------------------------------------------------------------

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: ``6 N + 12 * n_layer * n_embd * T``.

        ``N`` counts the weights a token is multiplied by: every Linear in the blocks and the
        output head's ``V * n_embd`` once, tied to ``wte`` or not. Embedding lookups (``wte``,
        ``wpe``) are not matmuls and are not counted; nor are LayerNorms and biases
        (elementwise, under 0.5% of the total at any preset). ``T`` is the attention context
        (``block_size`` unless given). 6N covers the forward (2N) and backward (4N) matmuls;
        the second term the attention scores and weighted sums without causal savings
        (Kaplan et al. 2020 Table 1; PaLM Appendix B). Equals what
        ``torch.utils.flop_counter.FlopCounterMode`` counts for a forward and backward with
        the math attention kernel. Used for MFU.
        """
        t = self.config.block_size if seq_len is None else seq_len
        n = sum(self._matmul_params(m) for m in self.target_modules("all").values())
        return 6.0 * n + 12.0 * self.config.n_layer * self.config.n_embd * t

    # --- the interface: generation and analyses --------------------------------------------

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty :class:`~lmkit.models.base.KVCache` for ``n_layer`` layers and ``max_len``
        columns (buffers are allocated on the first write, so ``batch_size`` only documents)."""
        return KVCache(len(self.transformer.h), max_len)

    @contextmanager
    def capture(self, *, heads: bool = False, attn_probs: bool = False,
                edit_heads: HeadEdit | None = None) -> Iterator[Capture]:
        """See :meth:`LanguageModel.capture`; per layer ``heads`` are ``(B, n_head, T, head_dim)``
        and ``attn_probs`` ``(B, n_head, T, S)``."""
        cap = Capture(want_heads=heads, want_probs=attn_probs, edit_heads=edit_heads)
        modules = list(self._attention_modules())
        before = [m.capture for m in modules]
        for m in modules:
            m.capture = cap
        try:
            yield cap
        finally:
            for m, old in zip(modules, before, strict=True):
                m.capture = old

    # --- forward ---------------------------------------------------------------------------

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        last_only: bool = False,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(logits, None)``, or ``(None, loss)`` when ``targets`` are given.

        Logits are ``(B, T, V)`` (``(B, 1, V)`` with ``last_only``). With ``targets`` the loss
        is the mean cross-entropy over targets that are not ``-100``; the logits are not
        returned and nothing keeps them (backward needs only the log-softmax output), so
        they are freed before backward.

        Inference-only arguments (training passes none of them):

        - ``position_ids`` ``(B, T)`` int64: each token's position (default
          ``kv_cache.length + 0..T-1``, or ``0..T-1``); the caller keeps them below
          ``block_size``.
        - ``attn_mask`` ``(B, 1, T, S)`` bool, True where a query may attend to a key;
          ``S = kv_cache.length + T`` (or ``T``). Default: causal.
        - ``kv_cache``: keys/values of earlier columns; this call appends its ``T``
          columns to it (see :class:`~lmkit.models.base.KVCache`).
        - ``return_hidden``: the final hidden states ``(B, T, n_embd)`` (after ``ln_f``)
          instead of logits; ``output_head()`` maps them to logits.

        Raises:
            ValueError: when ``T > block_size`` (or the cache would pass it without explicit
                ``position_ids``), or ``return_hidden`` with ``targets``.
        """
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        if T > self.config.block_size or (position_ids is None and past + T > self.config.block_size):
            raise ValueError(f"sequence length {past + T} exceeds block_size {self.config.block_size}")
        if return_hidden and targets is not None:
            raise ValueError("return_hidden gives hidden states, not a loss: pass targets=None")
        x = self.transformer.wte(idx)
        if position_ids is None and past:
            position_ids = torch.arange(past, past + T, device=idx.device).expand(B, T)
        if "wpe" in self.transformer:
            pos = torch.arange(T, device=idx.device) if position_ids is None else position_ids
            x = x + self.transformer.wpe(pos)
        if "ln_emb" in self.transformer:
            x = self.transformer.ln_emb(x)
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
        if targets is None:
            if last_only:
                x = x[:, -1:, :]
            return (x if return_hidden else self.lm_head(x)), None
        return None, cross_entropy(self.lm_head(x), targets)
