"""The model interface: what every family gives, and what code outside ``lmkit/models`` may use.

Generation, evaluation, training, the memory tools, ``doctor`` and export talk to a model
only through :class:`LanguageModel`; none of them reaches into a family's modules
(``model.transformer.h``, ``model.lm_head``). A new family subclasses it, registers its
config (:func:`lmkit.config.register_model_family`) and works everywhere.

The contract (``B`` batch, ``T`` tokens, ``V`` vocabulary, ``d`` model width):

* ``forward(idx (B, T), targets=None, *, last_only, position_ids, attn_mask, kv_cache,
  return_hidden) -> (logits | None, loss | None)``. With ``targets`` (``(B, T)``, ids or
  :data:`IGNORE_INDEX`) it returns ``(None, loss)``: the mean cross-entropy in nats per
  target token, and the ``(B, T, V)`` logits are not returned nor kept (only what backward
  needs survives the call). Callers that need logits and a loss pass ``targets=None`` and
  compute the loss themselves. Without ``targets`` it returns ``(logits, None)``, or the
  final hidden states ``(B, T, d)`` with ``return_hidden=True`` (``output_head()`` maps them
  to logits), or only the last position with ``last_only=True``.
* :meth:`~LanguageModel.flops_per_token`, :meth:`~LanguageModel.num_params`.
* KV-cache generation: :meth:`~LanguageModel.new_kv_cache` gives the cache that ``forward``
  extends (``kv_cache=``), with ``position_ids`` and a boolean ``attn_mask`` for padded rows.
* ``grad_checkpointing`` (attribute; :meth:`~LanguageModel.set_grad_checkpointing`).
* :meth:`~LanguageModel.capture`: per-head outputs (before the attention output projection)
  and attention probabilities of the next forwards, and per-head edits (ablation).
* :meth:`~LanguageModel.target_modules`: named modules for layer-level features (adaptive
  SVD swaps linears with :meth:`~LanguageModel.swap_module`).
* :meth:`~LanguageModel.output_head`, :meth:`~LanguageModel.input_embedding`,
  :meth:`~LanguageModel.position_embedding`.
* Restoring a checkpoint whose layers changed shape: :meth:`~LanguageModel.load_state_dict_flexible`
  calls :meth:`~LanguageModel.prepare_load`, which runs every adapter registered with
  :func:`register_load_adapter` (and a family's own override) so that the freshly built
  model takes the checkpoint's structure before ``load_state_dict``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmkit.data.batching import IGNORE_INDEX  # the one definition: targets that are not scored
from lmkit.errors import CheckpointError, first_line

__all__ = ["IGNORE_INDEX", "LOAD_ADAPTERS", "TARGET_KINDS", "Capture", "HeadEdit", "KVCache", "LanguageModel",
           "transformer_blocks",
           "math_attention", "register_load_adapter"]

#: ``kind`` names of :meth:`LanguageModel.target_modules`.
TARGET_KINDS = ("attention", "mlp", "blocks", "head", "all")


class KVCache:
    """Keys and values of every layer for incremental decoding.

    Per layer two buffers of shape ``(B, n_head, max_len, head_dim)`` are allocated on the
    first write (dtype and device of the keys written). ``length`` is the number of
    positions (columns) already stored; a forward with ``kv_cache=`` writes its ``T`` new
    columns ``length..length+T-1`` in every layer and then advances ``length`` by ``T``.
    Columns are buffer slots, not token positions: with left padding a row's position is
    given by ``position_ids`` and its padding columns are hidden by ``attn_mask``.
    Build one with :meth:`LanguageModel.new_kv_cache`.
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


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                   is_causal: bool = False, dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out, returning its probabilities: ``softmax(q k^T / sqrt(D)) v``.

    Args:
        q: ``(B, H, T, D)``; k, v: ``(B, H, S, D)``.
        attn_mask: bool, broadcastable to ``(B, H, T, S)``, True = may attend.
        is_causal: query ``i`` sees keys ``<= i + S - T`` (ignored with ``attn_mask``).
        dropout_p: dropout on the probabilities used for the output (not on those returned).

    Returns:
        ``(y (B, H, T, D) in v's dtype, probs (B, H, T, S) float32)``. Scores, softmax and the
        weighted sum run in float32, so ``y`` equals ``F.scaled_dot_product_attention`` up to
        float rounding (Vaswani et al. 2017, eq. 1).
    """
    scale = 1.0 / math.sqrt(q.size(-1))
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif is_causal:
        T, S = scores.shape[-2:]
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    weights = F.dropout(probs, dropout_p) if dropout_p > 0 else probs
    return (weights @ v.float()).to(v.dtype), probs


#: ``edit(layer, y) -> y`` on one layer's per-head outputs ``(B, n_head, T, head_dim)``.
HeadEdit = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class Capture:
    """What :meth:`LanguageModel.capture` records, per layer (index = layer), from the most
    recent forward inside the ``with`` block (a later forward overwrites).

    Attributes:
        heads: each head's attention output before the output projection,
            ``(B, n_head, T, head_dim)`` per layer (after ``edit_heads``), or ``None`` entries
            when not requested / that layer did not run.
        attn_probs: attention probabilities ``(B, n_head, T, S)`` in float32 (``S`` = keys:
            cached columns + ``T``), rows summing to 1 over the keys each query may see.
            Computed by an exact math path (``softmax(q k^T / sqrt(head_dim))``, then ``@ v``)
            instead of the fused kernel, which does not return them: slower, for analyses.
        want_heads, want_probs: what was asked for.
        edit_heads: applied to each layer's per-head outputs before the projection.
    """

    want_heads: bool = False
    want_probs: bool = False
    edit_heads: HeadEdit | None = None
    heads: list[torch.Tensor | None] = field(default_factory=list)
    attn_probs: list[torch.Tensor | None] = field(default_factory=list)

    def record(self, layer: int, heads: torch.Tensor | None, probs: torch.Tensor | None) -> None:
        if self.want_heads and heads is not None:
            _put(self.heads, layer, heads)
        if self.want_probs and probs is not None:
            _put(self.attn_probs, layer, probs)


def _put(items: list[torch.Tensor | None], i: int, value: torch.Tensor) -> None:
    while len(items) <= i:
        items.append(None)
    items[i] = value


#: Adapters ``(model, state) -> None`` run by :meth:`LanguageModel.prepare_load`, in order.
LOAD_ADAPTERS: list[Callable[[LanguageModel, Mapping[str, torch.Tensor]], None]] = []


def register_load_adapter(fn: Callable[[LanguageModel, Mapping[str, torch.Tensor]], None]):
    """Register ``fn(model, state)`` to run before every flexible checkpoint load (usable as a
    decorator; returns ``fn``).

    An adapter looks at the checkpoint's state-dict keys and shapes and changes the freshly
    built model to match, e.g. an adaptive-SVD feature sees ``transformer.h.0.attn.c_attn.U``
    / ``.V`` and swaps that linear for its rank-``r`` layer (:meth:`LanguageModel.swap_module`)
    so that ``load_state_dict`` then fits. It must leave a model it has nothing to do with
    unchanged. Registering the same function twice runs it once.
    """
    if fn not in LOAD_ADAPTERS:
        LOAD_ADAPTERS.append(fn)
    return fn


class LanguageModel(nn.Module, abc.ABC):
    """Base class of every model family (see the module docstring for the contract).

    Attributes:
        config: the family's config (a :class:`lmkit.config.ModelConfigBase`); ``block_size``
            and ``vocab_size`` are read by callers.
        grad_checkpointing: recompute each block in backward instead of storing its
            activations (``torch.utils.checkpoint``), trading ~30% more compute for memory
            that no longer grows with depth. Only in training mode.
    """

    config: Any
    grad_checkpointing: bool = False

    # --- the forward ------------------------------------------------------------------

    @abc.abstractmethod
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, last_only: bool = False,
                position_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None,
                return_hidden: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(logits (B, T, V) | None, loss | None)``; see the module docstring."""

    # --- sizes ------------------------------------------------------------------------

    @abc.abstractmethod
    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token at context ``seq_len`` (default
        ``block_size``), for MFU."""

    def num_params(self, *, exclude_position_embeddings: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied head counts once).

        Args:
            exclude_position_embeddings: without the learned position table.
            exclude_embeddings: without the token and position tables (a head tied to the
                token table goes with it; an untied head stays).
        """
        drop: set[int] = set()
        pos = self.position_embedding()
        if (exclude_position_embeddings or exclude_embeddings) and pos is not None:
            drop.add(id(pos.weight))
        if exclude_embeddings:
            drop.add(id(self.input_embedding().weight))
        return sum(p.numel() for p in self.parameters() if id(p) not in drop)

    # --- accessors ----------------------------------------------------------------------

    @abc.abstractmethod
    def output_head(self) -> nn.Module:
        """The module mapping final hidden states ``(..., d)`` to logits ``(..., V)``
        (an ``nn.Linear`` with ``out_features == V`` unless a feature swapped it)."""

    @abc.abstractmethod
    def input_embedding(self) -> nn.Embedding:
        """The token embedding ``(V, d)`` (its weight is the head's when tied)."""

    def position_embedding(self) -> nn.Embedding | None:
        """The learned position table, or ``None`` (rotary or no positions)."""
        return None

    @property
    def tied_embeddings(self) -> bool:
        """Whether the output head's weight is the token embedding's (one tensor)."""
        return getattr(self.output_head(), "weight", None) is self.input_embedding().weight

    # --- generation -------------------------------------------------------------------

    @abc.abstractmethod
    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for ``batch_size`` rows of at most ``max_len`` columns."""

    # --- training switches --------------------------------------------------------------

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Turn gradient checkpointing on or off (same as setting ``grad_checkpointing``)."""
        self.grad_checkpointing = bool(enabled)

    # --- analyses -----------------------------------------------------------------------

    @abc.abstractmethod
    def capture(self, *, heads: bool = False, attn_probs: bool = False,
                edit_heads: HeadEdit | None = None) -> AbstractContextManager[Capture]:
        """Context manager: ``with model.capture(heads=True, attn_probs=True) as cap: model(idx)``
        fills ``cap.heads`` / ``cap.attn_probs`` (:class:`Capture`). ``edit_heads(layer, y)``
        replaces each layer's per-head outputs ``y`` before the output projection (head ablation:
        zero a head's slice). Asking for ``attn_probs`` runs the exact math attention path; with
        neither probabilities nor edits the fused kernel still runs. Outside the block the model
        computes as before."""

    @abc.abstractmethod
    def target_modules(self, kind: str = "all") -> dict[str, nn.Module]:
        """Named modules for layer-level features: module name (as in ``named_modules``, so
        ``get_submodule(name)`` finds it) -> the module, an ``nn.Linear`` unless swapped.

        Kinds (:data:`TARGET_KINDS`): ``attention`` (the attention projections), ``mlp``,
        ``blocks`` (both), ``head`` (the output head), ``all`` (blocks and head).

        Raises:
            ValueError: an unknown kind.
        """

    def swap_module(self, name: str, module: nn.Module) -> nn.Module:
        """Put ``module`` where ``name`` (a ``named_modules`` name) is and return the old one.
        Swapping a tied output head unties it (the new module owns its weights).

        Raises:
            ValueError: no module of that name.
        """
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = self.get_submodule(parent_name) if parent_name else self
            old = getattr(parent, attr)
        except AttributeError:
            raise ValueError(f"no module named {name!r}") from None
        if not isinstance(old, nn.Module):
            raise ValueError(f"{name!r} is not a module")
        setattr(parent, attr, module)
        return old

    # --- checkpoints --------------------------------------------------------------------

    def prepare_load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Change this model's structure to fit ``state`` (a checkpoint's state dict) before
        loading it: runs the adapters of :func:`register_load_adapter` in order. A family
        whose layers can change shape overrides this (calling ``super().prepare_load``)."""
        for adapter in list(LOAD_ADAPTERS):
            adapter(self, state)

    def load_state_dict_flexible(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> Any:
        """:meth:`prepare_load` then ``load_state_dict``: how checkpoints are restored, so that a
        checkpoint saved after a layer changed shape (a low-rank layer's factors) loads into a
        freshly built model.

        Raises:
            CheckpointError: the state still does not fit (one line: the first mismatch).
        """
        self.prepare_load(state)
        try:
            return self.load_state_dict(state, strict=strict)
        except RuntimeError as exc:  # torch's message spans lines: the keys and shapes, on one
            detail = " ".join(str(exc).split())
            raise CheckpointError(f"checkpoint weights do not fit the model: {first_line(RuntimeError(detail), 300)}") \
                from None

    # --- helpers for families -------------------------------------------------------------

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in TARGET_KINDS:
            raise ValueError(f"unknown target module kind {kind!r} (known: {', '.join(TARGET_KINDS)})")

    @staticmethod
    def _matmul_params(module: nn.Module) -> int:
        """Weights one token multiplies in ``module``: its ``matmul_params()`` when it defines one
        (a swapped-in low-rank layer), else ``weight.numel()``."""
        own = getattr(module, "matmul_params", None)
        if callable(own):
            return int(own())
        return int(module.weight.numel())



def transformer_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """The repeated blocks of a model: the children of its ``ModuleList`` s named ``h`` or
    ``blocks`` (the trunks of lmkit's families), the units FSDP shards one by one."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("h", "blocks"):
            yield from module


from lmkit.models import svd_linear as _svd_linear  # noqa: E402,F401  (registers the adaptive-SVD load adapter)
