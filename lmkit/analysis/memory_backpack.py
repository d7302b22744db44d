"""Memory terms of the Backpack families for the estimator (:mod:`lmkit.analysis.memory`), through
its per-family seam (:mod:`lmkit.analysis.memory_family`): what ``backpack``
(:class:`lmkit.models.backpack.Backpack`; Hewitt et al., "Backpack Language Models", ACL 2023,
arXiv 2305.16765) and ``backpack-legacy`` (:class:`lmkit.models.backpack_legacy.BackpackLegacy`)
add to the GPT of the same config.

``B`` batch, ``T`` tokens, ``N = B·T``, ``d`` = ``n_embd``, ``k`` = ``n_senses``, ``r`` =
``sense_mlp_ratio``, ``V`` vocabulary; ``a`` activation bytes (4 fp32, 2 under 16-bit
autocast); dropout-mask bytes ``m₃₂`` of an fp32 input and ``m_a`` of an ``a``-byte one (1 on
CUDA, which keeps bool masks; the input's size on the CPU); no masks when ``dropout = 0``.

**Parameters.** ``backpack``: the sense network (3 norms, ``(2r + r + r·k)·d²`` weights, MLP
biases ``r·d + d + r·d + k·d`` with ``bias``) and the weight network ``2d²`` (+ ``2d``).
``backpack-legacy``: its token table is ``V·d·k`` (not ``V·d``) and its sense predictor
``d² + d + d·k + k``.

**Saved for backward** (each measured with ``saved_tensors_hooks`` on the CPU, fp32 and bf16,
with and without dropout and gradient checkpointing: :func:`lmkit.analysis.memory_measure.measure_saved`):

==============================  ================================================================
``backpack``
sense network                   norm inputs ``3·(4Nd + 8N)`` (LayerNorm; RMSNorm's as in the
                                GPT), MLP inputs ``2·(aNd + 2a·N·r·d)``, masks ``2·m₃₂·Nd +
                                m_a·Nd + m_a·N·k·d``; with checkpointing only its input ``E x``
                                (``4Nd``)
senses                          ``a·N·k·d`` (for ``α·C``; the checkpointed mixture's input too)
α                               ``4·B·k·T²`` fp32 softmax output, plus its ``a``-byte cast
                                ``a·B·k·T²`` under autocast; none with checkpointing
q, k, o, causal mask            ``2aNd + aNd + T²`` (no mask with checkpointing)
weight copies (autocast)        ``2·(3r + r·k + 2)·d²``; with checkpointing the weight
                                network's ``2·2d²`` only
``backpack-legacy``
sense vectors                   ``a·N·k·d`` + the expanded sense weights ``a·N·k`` (both for the
                                mixture ``einsum``)
sense weights                   fp32: ``12·T·d + 4·T·k``; autocast: ``6·T·d``, the weight copies
                                ``2·(d² + d·k)``, softmax's output ``2·T·k`` (CPU: 16-bit;
                                ``4·T·k`` on CUDA, which runs softmax in fp32 -- not measured)
==============================  ================================================================

At ``backpack-europarl`` (B 32, T 512, k 16, fp16 on CUDA) α is 0.5 GiB fp32 plus a 0.25 GiB
copy per step. In backward, the sense mixture's step (right after the head) holds two fp32
``B·k·T²`` gradients and passes the senses' gradient ``a·N·k·d`` on to the sense network,
whose backward follows the contextualiser's blocks (autograd runs the later-created nodes
first); the legacy model's sense gradient (fp32 ``4·N·k·d``) and dense embedding gradient
``4·V·d·k`` (6.1 GB at ``backpack-europarl-legacy``) come last.
"""

from __future__ import annotations

from lmkit.analysis.memory_family import (
    BackwardStage,
    FamilyActivations,
    FamilyMemory,
    FamilyParams,
    dtype_bytes,
    norm_saved_bytes,
)
from lmkit.config import ModelConfig

__all__ = ["BACKPACK", "BACKPACK_LEGACY", "backpack_activations", "backpack_params", "legacy_activations",
           "legacy_params"]


def _masks(device: str, a: int) -> tuple[int, int]:
    """Dropout-mask bytes per element of an fp32 and of an ``a``-byte input."""
    return (1, 1) if device == "cuda" else (4, a)


# --------------------------------------------------------------------------------------
# backpack: the paper's model
# --------------------------------------------------------------------------------------


def backpack_params(cfg: ModelConfig) -> FamilyParams:
    """The sense network and the weight network's parameters (module docstring)."""
    d, k, r = cfg.n_embd, cfg.n_senses, cfg.sense_mlp_ratio
    sense_w = (2 * r + r + r * k) * d * d
    sense_b = (r * d + d + r * d + k * d) if cfg.use_mlp_bias else 0
    weight_w = 2 * d * d
    weight_b = 2 * d if cfg.use_attn_bias else 0
    return FamilyParams(extra=3 * cfg.norm_numel + sense_w + sense_b + weight_w + weight_b,
                        extra_matrices=sense_w + weight_w, largest_matrix=r * k * d * d)


def backpack_activations(cfg: ModelConfig, batch_size: int, seq_len: int, *, precision: str, device: str,
                         grad_checkpointing: bool) -> FamilyActivations:
    """The ``backpack`` rows of the module docstring's table, and its two backward stages:
    the sense mixture (after the head) and the sense network (after the blocks)."""
    a = dtype_bytes(precision)
    amp = a == 2
    m32, ma = _masks(device, a)
    B, T, d, k, r = batch_size, seq_len, cfg.n_embd, cfg.n_senses, cfg.sense_mlp_ratio
    N, drop = B * T, cfg.dropout > 0
    alpha = B * k * T * T
    sense_net = (3 * norm_saved_bytes(cfg, N, d) + 2 * (a * N * d + 2 * a * N * r * d)
                 + ((2 * m32 * N * d + ma * N * d + ma * N * k * d) if drop else 0))
    sense_copies = 2 * (3 * r + r * k) * d * d if amp else 0
    weight_copy = 2 * 2 * d * d if amp else 0
    senses = a * N * k * d
    saved = {
        "sense network": 4 * N * d if grad_checkpointing else sense_net,
        "senses B·T·k·d": senses,
        "α B·k·T²": 0 if grad_checkpointing else 4 * alpha + (a * alpha if amp else 0),
        "q, k, o, causal mask": 3 * a * N * d + (0 if grad_checkpointing else T * T),
        "sense weight copies": weight_copy + (0 if grad_checkpointing else sense_copies),
    }
    ck = " (checkpointed: recomputed in backward)" if grad_checkpointing else ""
    formulas = {
        "sense network": ("its input E·x 4·B·T·d (recomputed in backward)" if grad_checkpointing else
                          "3 norm inputs, 2 MLPs' inputs a·B·T·(d + 2r·d)" + (", dropout masks" if drop else "")),
        "senses B·T·k·d": "C(x) for α·C, a·B·T·k·d",
        "α B·k·T²": ("none" + ck) if grad_checkpointing else
                    "fp32 softmax output 4·B·k·T²" + (" + its 16-bit cast" if amp else ""),
        "q, k, o, causal mask": "3·a·B·T·d" + ("" if grad_checkpointing else " + T² bool mask"),
        "sense weight copies": ("2 B × weight network 2d²" + ("" if grad_checkpointing else
                                " + sense network (3r + r·k)·d²") if amp else "none in fp32"),
    }
    p = backpack_params(cfg)
    weight_params = 2 * d * d + (2 * d if cfg.use_attn_bias else 0)
    # recomputed α (fp32) and mask; its 16-bit cast is already released at the softmax's backward
    mix_recompute = 4 * alpha + T * T if grad_checkpointing else 0
    sense_recompute = (sense_net + sense_copies) if grad_checkpointing else 0
    stages = [
        BackwardStage("sense mixture backward", "head",
                      frees={"α B·k·T²": saved["α B·k·T²"], "q, k, o, causal mask": saved["q, k, o, causal mask"],
                             "senses B·T·k·d": senses, "sense weight copies": weight_copy},
                      grads=weight_params, temporaries=mix_recompute + 8 * alpha + a * N * d, carry=senses,
                      early_frees={} if grad_checkpointing else
                      {"senses B·T·k·d": senses, "α B·k·T²": a * alpha if amp else 0}),
        BackwardStage("sense network backward", "blocks",
                      frees={"sense network": saved["sense network"], "sense weight copies": sense_copies
                             if not grad_checkpointing else 0},
                      grads=p.extra - weight_params,
                      temporaries=sense_recompute + senses * (2 if drop else 1) + a * N * r * d
                      + (2 * r * k * d * d if amp else 0)),
    ]
    return FamilyActivations(saved=saved, formulas=formulas, stages=stages)


# --------------------------------------------------------------------------------------
# backpack-legacy: the d40efde model
# --------------------------------------------------------------------------------------


def legacy_params(cfg: ModelConfig) -> FamilyParams:
    """The sense predictor ``d² + d + d·k + k`` and the ``V·d·k`` sense table (module docstring)."""
    d, k = cfg.n_embd, cfg.n_senses
    return FamilyParams(extra=d * d + d + d * k + k, extra_matrices=d * d + d * k, largest_matrix=d * d,
                        token_table=cfg.vocab_size * d * k)


def legacy_activations(cfg: ModelConfig, batch_size: int, seq_len: int, *, precision: str, device: str,
                       grad_checkpointing: bool) -> FamilyActivations:
    """The ``backpack-legacy`` rows of the module docstring's table (not checkpointed: only the
    blocks are) and its backward stage, the sense mixture after the blocks."""
    a = dtype_bytes(precision)
    amp = a == 2
    B, T, d, k = batch_size, seq_len, cfg.n_embd, cfg.n_senses
    N = B * T
    if amp:
        weights = 6 * T * d + 2 * (d * d + d * k) + (4 if device == "cuda" else 2) * T * k
    else:
        weights = 12 * T * d + 4 * T * k
    saved = {"sense vectors B·T·k·d": a * N * k * d + a * N * k, "sense weights": weights}
    formulas = {"sense vectors B·T·k·d": "the table's rows and the expanded weights for the mixture, a·B·T·k·(d + 1)",
                "sense weights": "position-only predictor " + ("6·T·d + 16-bit weight copies" if amp else "12·T·d")
                                 + " + softmax output"}
    grad_senses = 4 * N * k * d  # the fp32 embedding output's gradient
    stages = [BackwardStage("sense mixture backward", "blocks", frees=dict(saved), grads=legacy_params(cfg).extra,
                            temporaries=(a * N * k * d if amp else 0) + 4 * N * d, carry=grad_senses)]
    # under autocast the fp32 table rows (forward's local `senses`) outlive their 16-bit cast
    return FamilyActivations(saved=saved, formulas=formulas, stages=stages,
                             forward_live=4 * N * k * d if amp else 0)


BACKPACK = FamilyMemory(params=backpack_params, activations=backpack_activations)
BACKPACK_LEGACY = FamilyMemory(params=legacy_params, activations=legacy_activations)
