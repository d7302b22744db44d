"""The per-family seam of the memory estimator (:mod:`lmkit.analysis.memory`).

:func:`~lmkit.analysis.memory.estimate_memory` and :func:`~lmkit.analysis.memory.count_params`
know lmkit's GPT. A family whose model is "GPT blocks plus something" (the Backpacks:
:mod:`lmkit.analysis.memory_backpack`) describes only the something, as a :class:`FamilyMemory`
in :data:`lmkit.analysis.memory.FAMILY_MEMORY` (keyed by ``model.type``):

* :meth:`FamilyMemory.params` -- a :class:`FamilyParams`: its parameters beyond the GPT of the
  same config (and its token table, when that is not ``V·d``);
* :meth:`FamilyMemory.activations` -- a :class:`FamilyActivations`: the bytes it saves for
  backward beyond that GPT (one breakdown row each), and the :class:`BackwardStage` in which
  each is freed, with the gradients and temporaries that stage allocates.

Plain arithmetic, no torch (as the estimator). Sizes in bytes; ``N = B·T`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from lmkit.config import ModelConfig


@dataclass(frozen=True)
class FamilyParams:
    """A family's parameters beyond the GPT of the same config.

    Attributes:
        extra: parameters outside the token/position tables, the head, the blocks and the
            final norms (the Backpack's sense and weight networks).
        extra_matrices: of which 2-D weights (Muon's; ``Linear`` weights).
        largest_matrix: the largest of those (Muon's Newton-Schulz temporaries), 0 if none.
        token_table: elements of the token embedding when it is not ``V·d`` (the legacy
            Backpack's ``V·d·k`` sense table), else ``None``.
    """

    extra: int
    extra_matrices: int
    largest_matrix: int = 0
    token_table: int | None = None


@dataclass(frozen=True)
class BackwardStage:
    """One step of backward that is not a GPT block, in the order backward meets it.

    Attributes:
        name: the phase's name (a peak may be reported there).
        after: ``head`` (right after ``lm_head``'s backward, before the last block's) or
            ``blocks`` (after block 0's, before the embedding backward).
        frees: :attr:`FamilyActivations.saved` row name -> the bytes of it this stage releases.
        early_frees: the part of ``frees`` already released at the stage's peak (saved by its
            first ops, which autograd releases once they have run).
        grads: parameters whose fp32 ``.grad`` appears here.
        temporaries: bytes alive at the stage's peak besides the saved tensors and ``carry``
            (gradient buffers of its ops; with checkpointing, what it recomputes).
        carry: gradient bytes this stage produces that stay alive until the next stage (or the
            embedding backward): an input's gradient waiting in autograd's buffer. Alive at
            the stage's own peak too.
    """

    name: str
    after: Literal["head", "blocks"]
    frees: dict[str, int]
    grads: int
    temporaries: int
    carry: int = 0
    early_frees: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FamilyActivations:
    """What a family saves for backward beyond the same-shape GPT.

    Attributes:
        saved: breakdown row name -> bytes saved after the forward (all alive at its end).
        formulas: row name -> the formula shown next to it.
        stages: the backward stages, in order.
        forward_live: bytes the forward still holds when it computes the loss beyond what it
            saves (a local variable of ``forward``); 0: the forward's end is no peak candidate.
    """

    saved: dict[str, int]
    formulas: dict[str, str]
    stages: list[BackwardStage] = field(default_factory=list)
    forward_live: int = 0


@dataclass(frozen=True)
class FamilyMemory:
    """A family's hooks: ``params(cfg)`` and ``activations(cfg, B, T, *, precision, device,
    grad_checkpointing)`` (see the module docstring)."""

    params: Callable[[ModelConfig], FamilyParams]
    activations: Callable[..., FamilyActivations]


def dtype_bytes(precision: str) -> int:
    """4 for ``fp32``, 2 for ``fp16``/``bf16`` autocast (the caller has checked the name)."""
    return 4 if precision == "fp32" else 2


def norm_saved_bytes(cfg: ModelConfig, tok: int, d: int) -> int:
    """Bytes one norm over an fp32 input saves: its input, and LayerNorm's mean and rstd or
    RMSNorm's rstd (plus, with a gain, the normalised ``x·rstd`` the gain multiplies)."""
    if getattr(cfg, "norm", "layernorm") == "rmsnorm":
        return 4 * tok * d + 4 * tok + (4 * tok * d if cfg.norm_affine else 0)
    return 4 * tok * d + 8 * tok
