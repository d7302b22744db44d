"""Backpack language models (the ``backpack`` family): Hewitt, Thickstun, Manning & Liang,
"Backpack Language Models", ACL 2023 (arXiv 2305.16765), sections 2-3.

A Backpack predicts the next token log-linearly from non-contextual **sense vectors**
(``B`` batch, ``T`` tokens, ``S`` key columns (cached + ``T``), ``V`` vocabulary, ``d`` =
``n_embd``, ``k`` = ``n_senses``, ``ℓ`` a sense)::

    o_i = Σ_ℓ Σ_{j <= i} α_ℓ[i, j] C(x_j)_ℓ                the Backpack representation (paper §2)
    logits_i = E o_i                                       log-linear in the senses; E = input embedding
    C(x) = FF(E x) reshaped to (k, d)                      the sense vectors of word x (§3)
    h_1..n = Transformer(x_1..n)                           the contextualiser: lmkit's GPT blocks (§3)
    α_ℓ[i, j] = softmax_{j <= i}(q_iℓ · k_jℓ / sqrt(d/k))  q, k = split(Linear(h) -> 2d), k heads of d/k

α is non-negative and sums to 1 over ``j <= i`` for each sense and position; there is no
``1/k`` in the sum over senses (as in the reference code). The sense network follows the
reference modelling code (HF ``stanfordnlp/backpack-gpt2``): embedding -> dropout -> LN ->
residual MLP d->r·d->d (with its own two LNs) -> MLP d->r·d->k·d (``r`` =
``sense_mlp_ratio``). Written from the paper and that layout; no code copied.

Reading and steering the senses (for the sense tools): :meth:`Backpack.sense_vectors`
``C(x)`` ``(..., k, d)``, :meth:`Backpack.sense_logits` ``E·C(x)_ℓ`` ``(..., k, V)``,
:meth:`Backpack.contextualization` α ``(B, k, T, T)``, :meth:`Backpack.capture` with
``alpha=True`` (α and the sense vectors of a forward), and :meth:`Backpack.scale_senses`
(multiply α_ℓ[i, j] by a factor per sense, or per source token and sense; zero = remove).
The layers are in :mod:`lmkit.models.backpack_layers`.

The Europarl experiment's original variant with a V × (d·k) sense table is
:class:`lmkit.models.backpack_legacy.BackpackLegacy` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmkit.config.backpack import BackpackConfig
from lmkit.models.backpack_layers import (
    BackpackCapture,
    BackpackKVCache,
    SenseNetwork,
    SenseWeightNetwork,
    mix_senses,
)
from lmkit.models.base import HeadEdit, KVCache, LanguageModel
from lmkit.models.gpt import CausalSelfAttention, RotaryEmbedding, gpt_trunk
from lmkit.models.gpt_layers import init_gpt2, init_nanochat
from lmkit.models.loss import cross_entropy

__all__ = ["Backpack", "BackpackCapture", "BackpackKVCache", "BackpackLegacy", "SenseNetwork", "mix_senses"]


class Backpack(LanguageModel):
    """The paper's Backpack LM (the ``backpack`` family); the interface is
    :class:`~lmkit.models.base.LanguageModel`, the maths is in the module docstring.

    Modules: ``transformer`` (the contextualiser, named as in :class:`~lmkit.models.gpt.GPT`:
    ``wte`` = E, ``wpe``, ``h``, ``ln_f``), ``sense_network`` (C), ``sense_weight_net`` (q, k of
    α), ``lm_head`` (its weight is ``wte``'s). ``return_hidden=True`` gives ``o`` ``(B, T, d)``.
    """

    def __init__(self, config: BackpackConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("config.vocab_size must be set")
        self.config = config
        d = config.n_embd
        self.transformer = gpt_trunk(config)
        self.sense_network = SenseNetwork(config)
        self.sense_weight_net = SenseWeightNetwork(config)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.rotary = (RotaryEmbedding(config.head_dim, config.block_size, config.rope_theta)
                       if config.pos_encoding == "rope" else None)
        self.grad_checkpointing = False
        self._sense_scale: torch.Tensor | None = None
        self._capture: BackpackCapture | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``init: gpt2`` (as :meth:`lmkit.models.gpt.GPT.reset_parameters` and the reference
        code): N(0, init_std) weights, zero biases, unit norms, ``*.c_proj.weight`` (the sense
        network's too) ``init_std / sqrt(2 * n_layer)``. ``init: nanochat``:
        :func:`~lmkit.models.gpt_layers.init_nanochat` (tied)."""
        if self.config.init == "nanochat":
            init_nanochat(self, tied=True)
            return
        init_gpt2(self, self.config.init_std, self.config.n_layer)

    # --- the interface: accessors ------------------------------------------------------

    def output_head(self) -> nn.Module:
        """``lm_head`` ``(..., d) -> (..., V)``, its weight the input embedding E."""
        return self.lm_head

    def input_embedding(self) -> nn.Embedding:
        """``transformer.wte`` = E, ``(V, d)``."""
        return self.transformer.wte

    def position_embedding(self) -> nn.Embedding | None:
        """The contextualiser's ``transformer.wpe`` (learned positions), else ``None``."""
        return self.transformer.wpe if "wpe" in self.transformer else None

    def target_modules(self, kind: str = "all") -> dict[str, nn.Module]:
        """``attention``: the contextualiser's ``c_attn`` (``c_q``/``c_k``/``c_v`` with ``qkv:
        separate``) and ``c_proj`` per layer, and
        ``sense_weight_net.c_attn`` (α's queries and keys); ``mlp``: the contextualiser's MLPs
        and the sense network's two (``sense_network.block.mlp.*``, ``sense_network.final_mlp.*``);
        ``head``: ``lm_head``. See :meth:`LanguageModel.target_modules`."""
        self._check_kind(kind)
        out: dict[str, nn.Module] = {}
        if kind != "head":
            for i, block in enumerate(self.transformer.h):
                if kind != "mlp":
                    for name in (("c_q", "c_k", "c_v") if block.attn.separate_qkv else ("c_attn",)):
                        out[f"transformer.h.{i}.attn.{name}"] = getattr(block.attn, name)
                    out[f"transformer.h.{i}.attn.c_proj"] = block.attn.c_proj
                if kind != "attention":
                    out[f"transformer.h.{i}.mlp.c_fc"] = block.mlp.c_fc
                    out[f"transformer.h.{i}.mlp.c_proj"] = block.mlp.c_proj
            if kind != "mlp":
                out["sense_weight_net.c_attn"] = self.sense_weight_net.c_attn
            if kind != "attention":
                sn = self.sense_network
                for name, mod in (("block.mlp.c_fc", sn.block.mlp.c_fc), ("block.mlp.c_proj", sn.block.mlp.c_proj),
                                  ("final_mlp.c_fc", sn.final_mlp.c_fc), ("final_mlp.c_proj", sn.final_mlp.c_proj)):
                    out["sense_network." + name] = mod
        if kind in ("head", "all"):
            out["lm_head"] = self.lm_head
        return out

    # --- the interface: sizes ------------------------------------------------------------

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: ``6 N + 12 * n_layer * d * T + 6 * d * T * (1 + k)``.

        ``N`` counts the weights a token multiplies (every Linear of the contextualiser, the
        sense network and the weight network, and the head's ``V * d`` once); embedding
        lookups, LayerNorms and biases are not counted. The second term is the
        contextualiser's attention (as :meth:`lmkit.models.gpt.GPT.flops_per_token`), the third
        the contextualisation: scores ``2 T d`` and the α-weighted sum ``2 T d k`` per token
        forward, times 3 with backward, without causal savings. ``T`` = ``block_size`` unless
        given. Equals ``torch.utils.flop_counter.FlopCounterMode``'s count of a forward and
        backward (math attention kernel)."""
        t = self.config.block_size if seq_len is None else seq_len
        c = self.config
        n = sum(self._matmul_params(m) for m in self.target_modules("all").values())
        return 6.0 * n + 12.0 * c.n_layer * c.n_embd * t + 6.0 * c.n_embd * t * (1 + c.n_senses)

    # --- senses: reading and steering ------------------------------------------------------

    def sense_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """``C(x)`` for token ids of any shape ``(...)`` -> ``(..., k, d)`` (word-only: the same
        for every position; call in eval mode for dropout-free vectors). Unscaled by
        :meth:`scale_senses`."""
        return self.sense_network(self.transformer.wte(ids))

    def sense_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The senses' projection onto the output space, ``E·C(x)_ℓ``: ``(...) -> (..., k, V)``
        (the paper's sense tables are its top and bottom entries)."""
        return self.lm_head(self.sense_vectors(ids))

    def contextualization(self, idx: torch.Tensor, **forward_kw) -> torch.Tensor:
        """α of one forward over ``idx`` ``(B, T)``: ``(B, k, T, T)`` float32, ``α[b, ℓ, i, j]`` the
        weight of ``C(x_j)_ℓ`` in ``o_i`` (0 for ``j > i``). ``forward_kw`` as :meth:`forward`
        (no ``targets``)."""
        with self.capture(alpha=True) as cap:
            self(idx, return_hidden=True, **forward_kw)
        return cap.alpha

    @contextmanager
    def scale_senses(self, factors: torch.Tensor) -> Iterator[None]:
        """Inside the block, multiply every weight ``α_ℓ[i, j]`` by a factor: ``factors`` ``(k,)``
        per sense, or ``(V, k)`` per source token ``x_j`` and sense (the paper's control
        experiments, topic steering and debiasing: 0 removes a sense, >1 steers towards it). Implemented as ``C(x_j)_ℓ`` times the
        factor, which is the same ``o`` (o is linear in each α·C product); α itself, as
        captured, is unchanged. Cached columns keep the factors they were computed with.

        Raises:
            ValueError: ``factors`` has another shape.
        """
        k, V = self.config.n_senses, self.config.vocab_size
        if tuple(factors.shape) not in ((k,), (V, k)):
            raise ValueError(f"sense factors must have shape ({k},) or ({V}, {k}), not {tuple(factors.shape)}")
        before, self._sense_scale = self._sense_scale, factors.to(self.transformer.wte.weight.device)
        try:
            yield
        finally:
            self._sense_scale = before

    # --- the interface: generation and analyses --------------------------------------------

    def new_kv_cache(self, batch_size: int, max_len: int) -> BackpackKVCache:
        """A :class:`BackpackKVCache`: ``n_layer`` contextualiser layers plus the α slot."""
        return BackpackKVCache(self.config.n_layer + 1, max_len)

    @contextmanager
    def capture(self, *, heads: bool = False, attn_probs: bool = False, edit_heads: HeadEdit | None = None,
                alpha: bool = False) -> Iterator[BackpackCapture]:
        """:meth:`LanguageModel.capture` of the contextualiser's heads (``(B, n_head, T,
        head_dim)`` per layer, probabilities ``(B, n_head, T, S)``), plus with ``alpha=True`` the
        contextualisation weights and sense vectors (:class:`BackpackCapture`)."""
        cap = BackpackCapture(want_heads=heads, want_probs=attn_probs, edit_heads=edit_heads, want_alpha=alpha)
        modules = [m for m in self.modules() if isinstance(m, CausalSelfAttention)]
        before = [m.capture for m in modules]
        before_self, self._capture = self._capture, cap
        for m in modules:
            m.capture = cap
        try:
            yield cap
        finally:
            self._capture = before_self
            for m, old in zip(modules, before, strict=True):
                m.capture = old

    # --- forward ---------------------------------------------------------------------------

    def _senses(self, idx: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Sense vectors of ``idx`` ``(B, T)`` as ``(B, k, T, d)``, times the sense factors."""
        if self.grad_checkpointing and self.training:
            senses = checkpoint(self.sense_network, emb, use_reentrant=False)
        else:
            senses = self.sense_network(emb)
        senses = senses.transpose(1, 2)
        scale = self._sense_scale
        if scale is not None:
            factor = scale.view(1, -1, 1, 1) if scale.dim() == 1 else scale[idx].transpose(1, 2).unsqueeze(-1)
            senses = senses * factor.to(senses.dtype)
        return senses

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
        """``(logits (B, T, V), None)``, or ``(None, loss)`` with ``targets`` (mean cross-entropy
        over targets that are not -100; the logits are not kept). Arguments as
        :meth:`lmkit.models.gpt.GPT.forward`: ``position_ids`` ``(B, T)``, ``attn_mask`` ``(B, 1,
        T, S)`` bool (for the contextualiser's attention and α alike), ``kv_cache`` a
        :class:`BackpackKVCache`, ``last_only`` (only the last position's α row and logits),
        ``return_hidden`` (``o`` ``(B, T, d)`` instead of logits).

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
        emb = self.transformer.wte(idx)
        senses = self._senses(idx, emb)

        # the contextualiser: lmkit's GPT blocks over the sequence
        if position_ids is None and past:
            position_ids = torch.arange(past, past + T, device=idx.device).expand(B, T)
        x = emb
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device) if position_ids is None else position_ids)
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
        q, k = self.sense_weight_net(self.transformer.ln_f(x))

        # the contextualisation weights α and the sum over senses and prefix
        causal = kv_cache is None and attn_mask is None
        mask = attn_mask
        if kv_cache is not None:
            k, senses = kv_cache.update(self.config.n_layer, k, senses)
            kv_cache.advance(T)
            if mask is None and T > 1:
                cols = torch.arange(past + T, device=idx.device)
                mask = cols[None, :] <= torch.arange(past, past + T, device=idx.device)[:, None]
        if last_only and targets is None:
            q = q[:, :, -1:]
            if mask is not None and mask.size(-2) > 1:
                mask = mask[..., -1:, :]
        if self.grad_checkpointing and self.training:
            o, alpha = checkpoint(mix_senses, q, k, senses, attn_mask=mask, is_causal=causal, use_reentrant=False)
        else:
            o, alpha = mix_senses(q, k, senses, attn_mask=mask, is_causal=causal)
        cap = self._capture
        if cap is not None and cap.want_alpha:
            cap.alpha, cap.senses = alpha, senses
        del alpha
        if targets is None:
            return (o if return_hidden else self.lm_head(o)), None
        return None, cross_entropy(self.lm_head(o), targets)


from lmkit.models.backpack_legacy import BackpackLegacy  # noqa: E402  (the documented path; no cycle)
