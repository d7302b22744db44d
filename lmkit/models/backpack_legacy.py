"""The ``backpack-legacy`` family: the "BackpackLM" of kavyavenk/multilingual-backpacks at
commit d40efde (SEEDS_SPEC §4.2), kept to reproduce that experiment's parameter count and
numbers. It is not the Backpack of Hewitt et al. 2023 (:class:`lmkit.models.backpack.Backpack`):

* the sense vectors are a table ``Embedding(V, d·k)`` (no sense network), hence
  ``V·d·(k-1)`` more parameters than a Transformer (1.64B at V = 250,002, d = 384, k = 16);
* the sense weights depend on positions only: ``w_t = softmax(Linear(d, k)(GELU(Linear(d, d)(P_t))))``
  ``(T, k)``, with ``P`` the position table -- the same for every token and every batch row;
* their mixture ``x_t = Σ_ℓ w_tℓ S(x_t)_ℓ + P_t`` is the INPUT of an ordinary pre-LN Transformer
  (lmkit's GPT blocks, learned positions), and the head ``lm_head`` is untied.

Module names are the original's (``sense_embeddings``, ``sense_predictor.0/.2``,
``pos_embeddings``, ``blocks.N.*``, ``ln_f``, ``lm_head``), so that a state dict of the original
code loads as it is (``_orig_mod.`` prefixes of a compiled model stripped). Written from the
original's description and forward pass, not copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmkit.config.backpack import BackpackLegacyConfig
from lmkit.models.base import Capture, HeadEdit, KVCache, LanguageModel
from lmkit.models.gpt import Block, CausalSelfAttention
from lmkit.models.gpt_layers import init_gpt2, make_norm
from lmkit.models.loss import cross_entropy

__all__ = ["BackpackLegacy"]


class BackpackLegacy(LanguageModel):
    """The d40efde BackpackLM (see the module docstring); the interface is
    :class:`~lmkit.models.base.LanguageModel`.

    ``input_embedding()`` is the sense table, ``(V, d·k)`` (the model's token embedding; wider
    than ``d``); ``output_head()`` the untied ``lm_head``. ``return_hidden=True`` gives the
    Transformer's final hidden states ``(B, T, d)`` after ``ln_f``.
    """

    def __init__(self, config: BackpackLegacyConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("config.vocab_size must be set")
        self.config = config
        d, k = config.n_embd, config.n_senses
        self.n_senses = k
        self.sense_embeddings = nn.Embedding(config.vocab_size, d * k)
        # the original's Linear layers here always have biases: d² + d + d·k + k parameters
        self.sense_predictor = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, k))
        self.pos_embeddings = nn.Embedding(config.block_size, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original's init: N(0, init_std) for Linear and Embedding weights, zero biases,
        unit LayerNorms, ``*.c_proj.weight`` ``init_std / sqrt(2 * n_layer)``."""
        init_gpt2(self, self.config.init_std, self.config.n_layer)

    # --- the interface: accessors ------------------------------------------------------

    def output_head(self) -> nn.Module:
        """``lm_head`` ``(..., d) -> (..., V)`` (untied)."""
        return self.lm_head

    def input_embedding(self) -> nn.Embedding:
        """``sense_embeddings``, ``(V, d·k)``: each row holds a token's ``k`` sense vectors."""
        return self.sense_embeddings

    def position_embedding(self) -> nn.Embedding:
        """``pos_embeddings`` ``(block_size, d)`` (also the sense weights' input)."""
        return self.pos_embeddings

    def target_modules(self, kind: str = "all") -> dict[str, nn.Module]:
        """``blocks.{i}.attn.c_attn``/``.attn.c_proj`` (``attention``), ``blocks.{i}.mlp.c_fc``/
        ``.mlp.c_proj`` (``mlp``), ``lm_head`` (``head``); the sense predictor is left out (it
        sees positions only)."""
        self._check_kind(kind)
        out: dict[str, nn.Module] = {}
        if kind != "head":
            for i, block in enumerate(self.blocks):
                if kind != "mlp":
                    for name in (("c_q", "c_k", "c_v") if block.attn.separate_qkv else ("c_attn",)):
                        out[f"blocks.{i}.attn.{name}"] = getattr(block.attn, name)
                    out[f"blocks.{i}.attn.c_proj"] = block.attn.c_proj
                if kind != "attention":
                    out[f"blocks.{i}.mlp.c_fc"] = block.mlp.c_fc
                    out[f"blocks.{i}.mlp.c_proj"] = block.mlp.c_proj
        if kind in ("head", "all"):
            out["lm_head"] = self.lm_head
        return out

    # --- the interface: sizes ------------------------------------------------------------

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: ``6 (N + d² + d·k + k·d) + 12 * n_layer * d * T``.

        ``N`` as :meth:`lmkit.models.gpt.GPT.flops_per_token` (blocks and head); ``d² + d·k``
        the sense predictor, counted once per token (exact at batch 1: it runs once per
        position and batch row shares it, so at batch ``B`` it costs ``1/B`` of that), ``k·d``
        the weighted sum of a token's ``k`` senses. Embedding lookups are not counted."""
        t = self.config.block_size if seq_len is None else seq_len
        c = self.config
        n = sum(self._matmul_params(m) for m in self.target_modules("all").values())
        d, k = c.n_embd, c.n_senses
        return 6.0 * (n + d * d + d * k + k * d) + 12.0 * c.n_layer * d * t

    # --- senses -------------------------------------------------------------------------

    def sense_weights(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The position-only sense weights ``softmax(sense_predictor(P[pos]))``: positions
        ``(...)`` -> ``(..., k)`` float32, each row summing to 1 (no token enters them)."""
        return torch.softmax(self.sense_predictor(self.pos_embeddings(position_ids)).float(), dim=-1)

    def sense_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """A token's rows of the sense table: ids ``(...)`` -> ``(..., k, d)``."""
        return self.sense_embeddings(ids).unflatten(-1, (self.n_senses, self.config.n_embd))

    # --- the interface: generation and analyses --------------------------------------------

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A :class:`~lmkit.models.base.KVCache` for the ``n_layer`` blocks (the input mixture
        needs nothing from earlier columns)."""
        return KVCache(self.config.n_layer, max_len)

    @contextmanager
    def capture(self, *, heads: bool = False, attn_probs: bool = False,
                edit_heads: HeadEdit | None = None) -> Iterator[Capture]:
        """See :meth:`LanguageModel.capture`; per layer ``heads`` ``(B, n_head, T, head_dim)``
        and ``attn_probs`` ``(B, n_head, T, S)``."""
        cap = Capture(want_heads=heads, want_probs=attn_probs, edit_heads=edit_heads)
        modules = [m for m in self.modules() if isinstance(m, CausalSelfAttention)]
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
        """``(logits (B, T, V), None)`` or ``(None, loss)``; arguments as
        :meth:`lmkit.models.gpt.GPT.forward`.

        Raises:
            ValueError: ``T > block_size`` (or the cache would pass it without explicit
                ``position_ids``), or ``return_hidden`` with ``targets``.
        """
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        if T > self.config.block_size or (position_ids is None and past + T > self.config.block_size):
            raise ValueError(f"sequence length {past + T} exceeds block_size {self.config.block_size}")
        if return_hidden and targets is not None:
            raise ValueError("return_hidden gives hidden states, not a loss: pass targets=None")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=idx.device)  # (T,): shared by the rows
        pos = self.pos_embeddings(position_ids)  # (T, d) or (B, T, d)
        weights = torch.softmax(self.sense_predictor(pos), dim=-1).expand(B, T, self.n_senses)
        senses = self.sense_vectors(idx)  # (B, T, k, d)
        x = torch.einsum("btkd,btk->btd", senses, weights.to(senses.dtype)) + pos
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, None, attn_mask, kv_cache, i, use_reentrant=False)
            else:
                x = block(x, None, attn_mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.ln_f(x)
        if targets is None:
            if last_only:
                x = x[:, -1:, :]
            return (x if return_hidden else self.lm_head(x)), None
        return None, cross_entropy(self.lm_head(x), targets)
