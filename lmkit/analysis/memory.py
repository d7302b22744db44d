"""Training-memory estimator for lmkit's GPT (:mod:`lmkit.models.gpt`), and the WikiText GPT guide's hand table.

Everything here is arithmetic on a :class:`~lmkit.config.ModelConfig`; nothing imports torch,
so ``lmkit doctor`` can answer "would this fit on a 16 GiB card?" in milliseconds, on any machine.
All sizes are in bytes; ``B`` is the micro-batch size (sequences), ``T`` the sequence length
(tokens), ``d`` = ``n_embd``, ``h`` = ``n_head``, ``f`` = ``d_ff``, ``V`` = ``vocab_size``,
``L`` = ``n_layer``, ``P`` the number of (distinct) parameters.

What one training step keeps on the device (fp32 master weights, AdamW, eager PyTorch --
no ``torch.compile``):

* **weights** ``4 P``; **gradients** ``4 P`` (fp32 ``.grad``, also under AMP); **AdamW state**
  ``8 P`` (``exp_avg`` + ``exp_avg_sq``). EleutherAI, "Transformer Math 101" (2023), section
  "Model Parameters / Optimizer States / Gradients": 4 + 4 + 8 = 16 bytes per parameter for
  fp32 training with AdamW.
* **activations saved for backward**, per layer (:func:`layer_activations`). Korthikanti et al.
  2022, "Reducing Activation Recomputation in Large Transformer Models" (arXiv 2205.05198),
  section 4.1 / eq. (1): ``s·b·h·(34 + 5·a·s/h)`` bytes per layer = ``34·s·b·h + 5·a·s²·b`` with
  16-bit activations, where their ``s, b, h, a`` are our ``T, B, d, n_head``. Their 34 counts
  16 two-byte values per token and channel (LN inputs 2+2, QKV input 2, Q and K 4, V 2, attention
  output 2, MLP input 2, GELU input 8, GELU output 8) plus two one-byte dropout masks; the
  ``5·a·s²·b`` are the softmax output (2), the attention-dropout mask (1) and its output (2). lmkit's
  GPT differs in ways the estimator follows exactly (each checked with
  ``torch.autograd.graph.saved_tensors_hooks``): the residual stream stays fp32 under autocast,
  so the two LayerNorm inputs cost 4 bytes each (38 instead of 34 under AMP); Q, K, V are views
  of one ``c_attn`` output (``3·d`` values) and, with rotary positions, the rotated q and k are two
  more tensors (+2·d); fused SDPA (FlashAttention / memory-efficient) stores its output and a
  ``B·h·T`` fp32 log-sum-exp instead of the ``T²`` scores (Dao et al. 2022, "FlashAttention",
  section 3.1); the math ("eager") SDPA kernel stores scaled copies of q and k, a contiguous v,
  and the ``B·h·T²`` softmax output (+ dropout mask and output when ``dropout > 0``).
* **autocast weight copies** (AMP only): autocast casts each matmul weight to 16 bits once per
  forward and the matmul saves that copy for backward: ``2 ×`` (all ``Linear`` weights, the tied
  head included). Not in either source; measured.
* **embeddings and final norm**: token ids and targets (int64), the embedding dropout mask,
  ``ln_f``'s input and ``lm_head``'s input.
* **logits and loss**: ``F.cross_entropy`` is ``log_softmax`` (autocast runs it in fp32 and it
  saves its fp32 output, ``4·B·T·V``) then ``nll_loss``. With targets the model returns no
  logits and keeps none (:meth:`lmkit.models.base.LanguageModel.forward`), so the logits
  (``a·B·T·V``, ``a`` = 4 fp32 / 2 AMP) and autocast's fp32 copy of them live only inside the
  forward, below the backward peak; the first thing backward does is allocate the gradient of
  the log-probabilities and of the logits, ``4·B·T·V`` each. On the CPU with fp32 logits lmkit's
  loss (:mod:`lmkit.models.loss`) saves ``d(logits)`` itself (``4·B·T·V``, computed in the
  forward) and backward scales it in place: no new ``B·T·V`` buffer. With GPT-2's 50,257-token
  vocabulary this term is larger than all layers together for short models -- the seed's
  table (below) leaves it out. The spec's "3.3 GB at B=32, T=512" is one fp32 ``B·T·V`` copy,
  the one the training loop used to keep alive (``_, loss = model(x, y)`` held the logits
  until the step ended).
* **nanochat's options** (:class:`~lmkit.config.GPTConfig`): RMSNorm keeps its input and
  rstd (and, with a gain, the normalised input); QK-norm its fp32 inputs and rstd, and SDPA the
  normalised q, k; separate ``c_q``/``c_k``/``c_v`` keep only ``v`` when rotary or QK-norm
  consume q and k (under AMP each casts its input); ReLU² keeps what GELU keeps; a logit
  soft-cap keeps tanh's fp32 output (``4·B·T·V``) next to the log-probs. Each measured with
  ``saved_tensors_hooks`` (:func:`lmkit.analysis.memory_measure.measure_saved`).
* **optimizer** ``muon``: Muon's momentum buffer (4 B) for the blocks' matrices, AdamW's 8 B for
  the rest.
* **framework overhead**: the CUDA context (driver, kernels; not seen by PyTorch's allocator) and
  the caching allocator's slack (reserved but not allocated: block rounding, fragmentation) as a
  fraction of the peak allocated bytes (:class:`FrameworkOverhead`).

The peak is not the sum of these: with ``optimizer.zero_grad(set_to_none=True)`` gradients are
allocated during backward while activations are freed. :func:`estimate_memory` walks backward
(loss, head, each layer from the last, embeddings, optimizer step), tracks what is alive at each
point and reports the largest total -- what ``torch.cuda.max_memory_allocated()`` measures -- and
the breakdown at that moment. Gradient checkpointing (one ``torch.utils.checkpoint`` per block)
keeps only the ``L`` block inputs (``4·B·T·d`` each) and recomputes one block at a time in backward.

Other families: a model made of GPT blocks plus parts of its own describes those parts in
:data:`FAMILY_MEMORY` (its parameters, the bytes it saves for backward, the backward stages
that free them; :mod:`lmkit.analysis.memory_family`); the Backpacks' are in
:mod:`lmkit.analysis.memory_backpack` (sense network, senses ``B·T·k·d``, α ``B·k·T²``).

The WikiText GPT guide's hand table is :func:`legacy_seed001` (SEEDS_SPEC 5.3).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from lmkit.analysis import memory_backpack
from lmkit.analysis.memory_family import FamilyActivations, FamilyMemory, FamilyParams
from lmkit.analysis.memory_family import norm_saved_bytes as _norm_saved
from lmkit.config import ModelConfig, RunConfig
from lmkit.errors import ConfigError

GiB = 2**30
MiB = 2**20
GB = 10**9

Precision = Literal["fp32", "fp16", "bf16"]
Attention = Literal["sdpa", "eager"]

#: Fraction of a card's memory above which a run is "tight" rather than "fits".
TIGHT_FRACTION = 0.9

#: ``model.type`` -> what that family adds to the GPT arithmetic (:mod:`lmkit.analysis.memory_family`);
#: a family not listed is the GPT (its blocks, embeddings, head).
FAMILY_MEMORY: dict[str, FamilyMemory] = {
    "backpack": memory_backpack.BACKPACK,
    "backpack-legacy": memory_backpack.BACKPACK_LEGACY,
}


def _family(cfg: ModelConfig) -> FamilyMemory | None:
    return FAMILY_MEMORY.get(getattr(cfg, "type", "gpt"))


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of :class:`~lmkit.models.gpt.GPT` for a config, from its shapes alone.

    Attributes:
        total: distinct parameters (a tied head counts once) -- ``sum(p.numel())``.
        embeddings: token (``wte``) + learned position (``wpe``) embeddings.
        head: an untied ``lm_head`` (0 when tied).
        per_layer: one transformer block.
        matmul_weights: every ``Linear`` weight, the (tied) head included -- what autocast copies.
        layer_matmul_weights: the ``Linear`` weights of one block.
        extra: a family's own parameters beyond the GPT's (:class:`FamilyParams`; 0 for the GPT).
        extra_matrices: of which 2-D weights (Muon's).
        token_table: elements of the token embedding (``V·d``; ``V·d·k`` for backpack-legacy).
    """

    total: int
    embeddings: int
    head: int
    per_layer: int
    matmul_weights: int
    layer_matmul_weights: int
    extra: int = 0
    extra_matrices: int = 0
    token_table: int = 0

    @property
    def non_embedding(self) -> int:
        return self.total - self.embeddings - self.head


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Count the parameters lmkit's GPT has for ``cfg`` (``vocab_size`` must be set).

    Per block: ``ln_1, ln_2`` ``d`` (+``d`` bias) each (:attr:`GPTConfig.norm_numel
    <lmkit.config.GPTConfig.norm_numel>`: RMSNorm ``d``, none without ``norm_affine``);
    ``c_attn`` (or ``c_q, c_k, c_v``) ``3d²`` (+``3d``); attention ``c_proj`` ``d²`` (+``d``);
    ``c_fc`` ``d·f`` (+``f``); MLP ``c_proj`` ``f·d`` (+``d``). Plus ``wte`` ``V·d``, ``wpe``
    ``block_size·d`` (learned positions), ``ln_emb`` (``embed_norm``), ``ln_f``, and an untied
    ``lm_head`` ``V·d``. A family in :data:`FAMILY_MEMORY` adds its own (the Backpacks' sense
    networks: :mod:`lmkit.analysis.memory_backpack`) and may widen the token table.

    Raises:
        ConfigError: ``vocab_size`` is not set.
    """
    V = _vocab(cfg)
    d, f = cfg.n_embd, cfg.ff_dim
    ln = cfg.norm_numel
    attn_b = cfg.use_attn_bias
    mlp_b = cfg.use_mlp_bias
    layer_mm = 3 * d * d + d * d + d * f + f * d
    per_layer = 2 * ln + layer_mm + (4 * d if attn_b else 0) + ((f + d) if mlp_b else 0)
    family = _family(cfg)
    fp = family.params(cfg) if family is not None else FamilyParams(0, 0)
    table = V * d if fp.token_table is None else fp.token_table
    embeddings = table + (cfg.block_size * d if cfg.pos_encoding == "learned" else 0)
    head = 0 if cfg.tie_embeddings else V * d
    total = embeddings + cfg.n_layer * per_layer + ln * (2 if cfg.embed_norm else 1) + head + fp.extra
    return ParamCounts(total=total, embeddings=embeddings, head=head, per_layer=per_layer,
                       matmul_weights=cfg.n_layer * layer_mm + V * d + fp.extra_matrices,
                       layer_matmul_weights=layer_mm, extra=fp.extra, extra_matrices=fp.extra_matrices,
                       token_table=table)


def _vocab(cfg: ModelConfig) -> int:
    if cfg.vocab_size is None:
        raise ConfigError("model.vocab_size is not set; give it with --set model.vocab_size=N")
    return cfg.vocab_size


def resolve_vocab_size(config: RunConfig) -> int:
    """``model.vocab_size``, or the size the configured tokenizer will give, without reading data.

    ``char`` on the arithmetic task has the arithmetic experiment's 35 symbols; ``byte`` 257; ``gpt2`` 50,257;
    ``bpe`` ``data.bpe_vocab_size``.

    Raises:
        ConfigError: the size depends on the data (a ``char`` tokenizer on a text corpus, an
            unknown ``hf:`` tokenizer) -- the message says to pass ``--set model.vocab_size=N``.
    """
    if config.model.vocab_size is not None:
        return config.model.vocab_size
    tok = config.data.tokenizer
    from lmkit.data.tokenizers import CHAR_SPECIALS, KNOWN_VOCAB_SIZES, SEED_ALPHABET

    if tok == "char" and config.data.dataset == "arithmetic":
        return len(CHAR_SPECIALS) + len(SEED_ALPHABET)
    if tok in KNOWN_VOCAB_SIZES:
        return KNOWN_VOCAB_SIZES[tok]
    if tok == "bpe":
        return config.data.bpe_vocab_size
    raise ConfigError(f"data.tokenizer {tok}: its vocabulary size depends on the data; "
                      "give it with --set model.vocab_size=N")


# --------------------------------------------------------------------------------------
# Framework overhead
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameworkOverhead:
    """What a CUDA process costs beyond PyTorch's allocated tensors.

    Attributes:
        cuda_context_bytes: driver context, loaded kernels (cuBLAS, cuDNN, PyTorch's own) --
            memory NVML shows but ``torch.cuda.memory_reserved()`` does not. 0.5 GiB is a typical
            figure with CUDA 12's lazy module loading (it varies with GPU, driver and libraries);
            ``benchmarks/memory_estimate.py --device cuda`` reports the real one (NVML used minus
            reserved) -- it has not been calibrated on a GPU yet.
        allocator_slack: reserved-but-unallocated memory of the caching allocator (2 MiB /
            20 MiB block rounding, fragmentation) as a fraction of the peak allocated bytes.
        workspace_bytes: cuBLAS / cuBLASLt workspaces, allocated through the caching allocator
            (so counted in ``max_memory_allocated``).
    """

    cuda_context_bytes: int = 512 * MiB
    allocator_slack: float = 0.05
    workspace_bytes: int = 32 * MiB

    def total(self, peak_allocated: int) -> int:
        return self.cuda_context_bytes + int(self.allocator_slack * peak_allocated)


# --------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------


def _dtype_bytes(precision: str) -> int:
    if precision not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"precision {precision!r}: use fp32, fp16 or bf16")
    return 4 if precision == "fp32" else 2


def layer_activations(cfg: ModelConfig, batch_size: int, seq_len: int, *, precision: str = "fp32",
                      attention: str = "sdpa", device: str = "cuda") -> dict[str, int]:
    """Bytes one block saves for backward, by tensor (``B`` = batch_size, ``T`` = seq_len).

    ``a`` = 4 (fp32) or 2 (fp16/bf16 autocast) bytes per activation; the residual stream (the
    norm inputs) is fp32 in both; ``m`` = dropout-mask bytes per element (1 on CUDA, where
    ``native_dropout`` keeps a bool mask; ``a`` on the CPU, which keeps a float mask).

    ======================================  ===========================================
    norm inputs (ln_1, ln_2)                ``2 · 4·B·T·d`` + LayerNorm mean/rstd ``2 · 8·B·T``
                                            (RMSNorm: rstd ``2 · 4·B·T``, and with a gain the
                                            normalised ``x·rstd`` it multiplies, ``2 · 4·B·T·d``)
    c_attn input, c_fc input                ``2 · a·B·T·d`` (under AMP: the 16-bit copies;
                                            ``qkv: separate`` under AMP casts the input once per
                                            c_q/c_k/c_v: ``4 · a·B·T·d``)
    q, k, v                                 ``3 · a·B·T·d`` (sdpa: the c_attn output; eager:
                                            scaled q, k and a contiguous v); ``separate`` with
                                            rotary or QK-norm: only v, ``a·B·T·d``
    rotated q, k (rope + sdpa)              ``2 · a·B·T·d`` (+ four 16-bit cos/sin tables
                                            ``T·d_head`` under AMP, any kernel)
    QK-norm (qk_norm)                       inputs ``2 · 4·B·T·d`` (fp32: autocast runs
                                            rms_norm in fp32) + rstd ``2 · 4·B·h·T``; sdpa then
                                            keeps the normalised q, k (``2 · a·B·T·d``) instead
                                            of the rotated ones
    attention output (= c_proj input)       ``a·B·T·d`` (with QK-norm and sdpa one more: the
                                            output is copied to ``(B, T, d)`` before c_proj)
    log-sum-exp (sdpa)                      ``4·B·h·T`` (CUDA fp32 pads T to 32)
    activation input, output                ``2 · a·B·T·f`` (GELU: its input and output;
                                            ReLU²: relu's output, which square also keeps, and
                                            square's output)
    residual dropout masks (dropout > 0)    ``2 · m·B·T·d``
    attention scores (eager only)           ``B·h·T² · (a + [dropout] (m + a))``
    ======================================  ===========================================

    With ``f = 4d``, fp16, sdpa, no rotary and dropout: 38·B·T·d bytes (Korthikanti et al. 2022
    eq. 1 has 34; the difference is the fp32 residual) and the eager kernel adds their
    ``5·h·T²·B``. The RMSNorm, QK-norm, ReLU² and separate-QKV rows were measured with
    ``saved_tensors_hooks`` on the CPU (:func:`lmkit.analysis.memory_measure.measure_saved`).

    Raises:
        ConfigError: unknown precision or attention kernel.
    """
    if attention not in ("sdpa", "eager"):
        raise ConfigError(f"--attention {attention}: use sdpa or eager")
    a = _dtype_bytes(precision)
    m = 1 if device == "cuda" else a
    ms = 1 if device == "cuda" else 4  # the math kernel's dropout runs in fp32
    B, T, d, f, h = batch_size, seq_len, cfg.n_embd, cfg.ff_dim, cfg.n_head
    tok = B * T
    drop = cfg.dropout > 0
    rope = cfg.pos_encoding == "rope"
    separate = getattr(cfg, "qkv", "fused") == "separate"
    qk_norm = bool(getattr(cfg, "qk_norm", False))
    sdpa = attention == "sdpa"
    if sdpa:
        # separate q and k outputs are saved only when SDPA (or QK-norm on fp32) takes them as they come
        raw_qk = (not rope) and not (qk_norm and a == 2)
        qkv = 3 * a * tok * d if (not separate or raw_qk) else a * tok * d
    else:
        qkv = 3 * 4 * tok * d
    rotated = 0
    if rope:
        rotated = (2 * a * tok * d if sdpa and not qk_norm else 0) + (4 * 2 * T * cfg.head_dim if a == 2 else 0)
    qk = 0
    if qk_norm:
        # the inputs are saved unless they are views already counted (fp32, no rotary, fused: c_attn's output)
        inputs = 0 if (a == 4 and not rope and sdpa) else 2 * 4 * tok * d
        qk = inputs + 2 * 4 * B * h * T + (2 * a * tok * d if sdpa else 0)
    out: dict[str, int] = {
        "layernorm inputs": 2 * _norm_saved(cfg, tok, d),
        "c_attn + c_fc inputs": (4 if (separate and a == 2) else 2) * a * tok * d,
        "q, k, v": qkv,
        "rotated q, k": rotated,
        "qk-norm": qk,
        "attention output": a * tok * d * (2 if qk_norm and sdpa else 1),
        "log-sum-exp": 4 * B * h * (_pad32(T) if (device == "cuda" and a == 4) else T) if sdpa else 0,
        "GELU input + output": 2 * a * tok * f,
        "dropout masks": 2 * m * tok * d if drop else 0,
        "attention scores": B * h * T * T * (4 + ((ms + 4) if drop else 0)) if not sdpa else 0,
    }
    return out


def _pad32(n: int) -> int:
    return 32 * math.ceil(n / 32)


# --------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryRow:
    """One line of the breakdown: full size, the part alive at the peak, and its formula."""

    name: str
    size_bytes: int
    at_peak_bytes: int
    formula: str


@dataclass
class MemoryEstimate:
    """Result of :func:`estimate_memory`. Bytes throughout.

    Attributes:
        rows: the breakdown (weights, gradients, optimizer state, activations, attention scores,
            autocast copies, embeddings + final norm, logits + loss, backward temporaries).
        per_layer: :func:`layer_activations` of one block.
        saved_for_backward: bytes of all non-parameter tensors saved for backward after the
            forward (what ``saved_tensors_hooks`` sees).
        peak_allocated: the largest ``torch.cuda.max_memory_allocated()`` of a step.
        peak_phase: where in the step that peak falls.
        overhead: CUDA context + allocator slack.
        total: ``peak_allocated + overhead`` -- what the card must hold.
    """

    n_params: int
    batch_size: int
    seq_len: int
    precision: str
    attention: str
    grad_checkpointing: bool
    grad_accum_steps: int
    device: str
    rows: list[MemoryRow]
    per_layer: dict[str, int]
    n_layer: int
    saved_for_backward: int
    model_state: int
    peak_allocated: int
    peak_phase: str
    overhead: int
    total: int
    overhead_detail: dict[str, int] = field(default_factory=dict)
    optimizer: str = "adamw"
    #: the walk through the step: ``(phase, {part: bytes alive})`` beyond the weights and the
    #: optimizer state (what :mod:`lmkit.analysis.memory_parallel` re-prices per rank); not in :meth:`to_dict`
    phases: list[tuple[str, dict[str, int]]] = field(default_factory=list, repr=False)

    def row(self, name: str) -> MemoryRow:
        return find_row(self.rows, name)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("phases")
        return out


def find_row(rows: list[MemoryRow], name: str) -> MemoryRow:
    """The row called ``name`` of a breakdown.

    Raises:
        KeyError: no such row.
    """
    for row in rows:
        if row.name == name:
            return row
    raise KeyError(name)


def estimate_memory(
    cfg: ModelConfig,
    batch_size: int,
    *,
    seq_len: int | None = None,
    precision: str = "fp32",
    attention: str = "sdpa",
    grad_checkpointing: bool = False,
    grad_accum_steps: int = 1,
    device: str = "cuda",
    fused_optimizer: bool | None = None,
    overhead: FrameworkOverhead | None = None,
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """Estimate the device memory of one AdamW (or Muon + AdamW) training step of lmkit's GPT, or
    of a family in :data:`FAMILY_MEMORY` (its rows follow the activations row).

    Args:
        cfg: the model (``vocab_size`` set; see :func:`resolve_vocab_size`).
        batch_size: sequences per micro-batch ``B``.
        seq_len: tokens per sequence ``T`` (default ``block_size``).
        precision: ``fp32``, or ``fp16``/``bf16`` autocast (fp32 master weights and grads).
        attention: ``sdpa`` (fused FlashAttention / memory-efficient kernel: no ``T²`` scores) or
            ``eager`` (PyTorch's math SDPA kernel, which materialises the ``B·h·T²`` scores; what
            runs on the CPU when ``dropout > 0``).
        grad_checkpointing: recompute each block in backward (``model.grad_checkpointing``).
        grad_accum_steps: >1 means gradients already exist during backward (from micro-step 2).
        device: ``cuda`` (bool dropout masks) or ``cpu`` (float masks); fused AdamW on both, as
            :func:`lmkit.training.optim.build_optimizer` chooses.
        fused_optimizer: override the fused-AdamW choice (fused: no step temporaries; foreach:
            ``4 P`` bytes of temporaries in the step, ``_foreach_sqrt`` of ``exp_avg_sq``).
        overhead: framework overhead; default :class:`FrameworkOverhead` on CUDA, none on CPU.
        optimizer: ``adamw`` (8 B of state per parameter) or ``muon`` (``training.optimizer``:
            Muon's momentum buffer, 4 B, for the blocks' matrices, whose update also needs one
            fp32 matrix and its bf16 Newton-Schulz copies; AdamW's 8 B for the rest).

    Returns:
        A :class:`MemoryEstimate`.

    Raises:
        ConfigError: ``vocab_size`` unset, ``seq_len > block_size``, ``batch_size < 1``, unknown
            precision, attention kernel or optimizer.
    """
    if optimizer not in ("adamw", "muon"):
        raise ConfigError(f"training.optimizer {optimizer!r}: use adamw or muon")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
    T = cfg.block_size if seq_len is None else seq_len
    if T < 1 or T > cfg.block_size:
        raise ConfigError(f"sequence length {T}: must be between 1 and block_size {cfg.block_size}")
    pc = count_params(cfg)
    V, d, B, L = _vocab(cfg), cfg.n_embd, batch_size, cfg.n_layer
    a = _dtype_bytes(precision)
    amp = a == 2
    r = 4
    tok = B * T
    P = pc.total
    fused = (device in ("cuda", "cpu")) if fused_optimizer is None else fused_optimizer
    if overhead is None:
        overhead = FrameworkOverhead() if device == "cuda" else FrameworkOverhead(0, 0.0, 0)

    family = _family(cfg)
    fam = (family.activations(cfg, B, T, precision=precision, device=device, grad_checkpointing=grad_checkpointing)
           if family is not None else FamilyActivations({}, {}))
    weights, grads_full, optim = 4 * P, 4 * P, 8 * P
    # Muon's parameters: the blocks' matrices and a family's own
    matrices = L * pc.layer_matmul_weights + pc.extra_matrices if optimizer == "muon" else 0
    optim -= 4 * matrices
    if matrices:
        biggest = max(d * cfg.ff_dim, d * d if getattr(cfg, "qkv", "fused") == "separate" else 3 * d * d,
                      family.params(cfg).largest_matrix if family is not None else 0)
        muon_step_tmp = 4 * biggest + 2 * 3 * biggest  # nesterov update (fp32), bf16 NS iterates
    else:
        muon_step_tmp = 0
    per_layer = layer_activations(cfg, B, T, precision=precision, attention=attention, device=device)
    A_layer = sum(per_layer.values())
    block_input = r * tok * d
    softcap = getattr(cfg, "logit_softcap", None) is not None
    # on the CPU with fp32 logits (lmkit.models.loss) the loss saves d(logits) alone, not the
    # targets, and backward scales that buffer in place; ATen's route saves the targets and
    # the total weight and allocates d(log-probs) and d(logits), 8·B·T·V
    fused_ce = device == "cpu" and (not amp or softcap)
    emb_final = {
        "ids + targets": (1 if fused_ce else 2) * 8 * tok + (8 * T if cfg.pos_encoding == "learned" else 0),
        "embedding dropout mask": (1 if device == "cuda" else 4) * tok * d if cfg.dropout > 0 else 0,
        "ln_f input + stats": _norm_saved(cfg, tok, d),
        "ln_emb input + stats": _norm_saved(cfg, tok, d) if getattr(cfg, "embed_norm", False) else 0,
        "lm_head input": a * tok * d,
    }
    E = sum(emb_final.values())
    head_copy = 2 * V * d if amp else 0
    layer_copies = 2 * pc.layer_matmul_weights if amp else 0
    # log_softmax's saved fp32 output (the logits themselves are not kept), and with a logit
    # soft-cap tanh's fp32 output
    log_probs = 4 * tok * V * (2 if softcap else 1)
    loss_grads = (4 * tok * V if softcap else 0) if fused_ce else 8 * tok * V

    # --- forward end: everything saved ------------------------------------------------
    acts_live = L * block_input if grad_checkpointing else L * A_layer
    copies_live = head_copy + (0 if grad_checkpointing else L * layer_copies)
    pre_grads = grads_full if grad_accum_steps > 1 else 0
    live = {"gradients": pre_grads, "activations": acts_live, "autocast copies": copies_live,
            "embeddings + final norm": E, "logits + loss": log_probs, "temporaries": 0, **fam.saved}
    loss_scalar = 0 if fused_ce else 4  # nll_loss's total weight (fp32); the CPU route keeps a Python int
    saved_for_backward = (L * A_layer + L * layer_copies + head_copy + E + log_probs + loss_scalar
                          if not grad_checkpointing else acts_live + copies_live + E + log_probs + loss_scalar)
    saved_for_backward += sum(fam.saved.values())
    events: list[tuple[str, dict[str, int]]] = []

    def record(phase: str) -> None:
        events.append((phase, dict(live)))

    def add_grads(numel: int) -> None:
        # fp32 .grad allocated on first use; with accumulation the new gradient is a temporary.
        if pre_grads:
            live["temporaries"] += 4 * numel
        else:
            live["gradients"] += 4 * numel

    carry = 0  # a family stage's input gradient, waiting in autograd's buffer for the next stage

    def family_stages(after: str) -> None:
        nonlocal carry
        for stage in (s for s in fam.stages if s.after == after):
            live["temporaries"] = stage.temporaries + stage.carry
            for name, freed in stage.early_frees.items():
                live[name] -= freed
            add_grads(stage.grads)
            record(stage.name)
            for name, freed in stage.frees.items():
                live[name] -= freed - stage.early_frees.get(name, 0)
            live["temporaries"], carry = 0, stage.carry

    # the loss being computed: logits (+ autocast's fp32 copy) next to the log-probs (or, on the
    # CPU route, d(logits)); below the backward peak on ATen's route, the peak on the CPU route
    # (a soft-cap's logits are its fp32 output ``c·tanh``: no autocast copy)
    logits_live = 4 * tok * V if softcap else a * tok * V + (4 * tok * V if amp else 0)
    live["logits + loss"] = log_probs + logits_live
    live["temporaries"] = fam.forward_live
    record("forward end (cross-entropy)")
    live["temporaries"] = 0

    # --- backward: loss -> head --------------------------------------------------------
    live["logits + loss"] = log_probs + loss_grads  # d(log-probs), d(logits) fp32 (ATen's route)
    record("loss backward (log_softmax)")
    live["logits + loss"] = 4 * tok * V + (2 * tok * V if amp else 0)
    live["temporaries"] = a * tok * d + (2 * V * d if amp else 0)
    add_grads(V * d if pc.head == 0 else pc.head)
    record("lm_head backward")
    live["logits + loss"] = 0
    live["autocast copies"] -= head_copy
    live["temporaries"] = 0
    live["embeddings + final norm"] = E - emb_final["lm_head input"] - emb_final["ln_f input + stats"]
    add_grads(cfg.norm_numel)
    family_stages("head")

    # --- backward: blocks, last first ---------------------------------------------------
    grad_resid = r * tok * d
    layer_tmp = grad_resid + a * tok * max(cfg.ff_dim, 3 * d) + (2 * max(d * cfg.ff_dim, 3 * d * d) if amp else 0)
    if attention == "eager":
        layer_tmp = max(layer_tmp, grad_resid + 2 * a * B * cfg.n_head * T * T)
    for i in range(L):
        if grad_checkpointing:
            live["activations"] += A_layer
            live["autocast copies"] += layer_copies
        add_grads(pc.per_layer)
        live["temporaries"] = layer_tmp + carry
        record(f"block {L - 1 - i} backward")
        live["temporaries"] = 0
        live["activations"] -= A_layer + (block_input if grad_checkpointing else 0)
        live["autocast copies"] -= layer_copies

    family_stages("blocks")

    # --- backward: embeddings -----------------------------------------------------------
    wte = pc.token_table
    live["embeddings + final norm"] = 0
    live["temporaries"] = grad_resid + carry + 4 * wte  # embedding_dense_backward's full-size gradient
    if pc.head == 0:  # tied: the head already allocated wte's gradient
        add_grads(pc.embeddings - wte)
    else:
        add_grads(pc.embeddings)
    record("embedding backward")

    # --- optimizer step -----------------------------------------------------------------
    live["temporaries"] = (0 if fused else 4 * (P - matrices)) + muon_step_tmp
    live["gradients"] = grads_full
    record("optimizer step")

    phase, at_peak = max(events, key=lambda e: sum(e[1].values()))
    peak = weights + optim + sum(at_peak.values()) + (overhead.workspace_bytes if device == "cuda" else 0)
    over = overhead.total(peak) if device == "cuda" else 0

    scores = per_layer["attention scores"]
    act_size = (L * block_input + A_layer) if grad_checkpointing else L * A_layer
    dt = "fp32" if not amp else f"{precision} autocast"
    if grad_checkpointing:
        act_formula = f"{L} block inputs × {_fmt(block_input)} + 1 recomputed block {_fmt(A_layer)}"
    else:
        act_formula = f"{_fmt(A_layer)} per layer × {L} layers ({dt})"
    rows = [
        MemoryRow("weights", weights, weights, f"4 B × {P:,} params (fp32 master copy)"),
        MemoryRow("gradients", grads_full, at_peak["gradients"], "4 B × params (fp32 .grad)"),
        MemoryRow("optimizer state", optim, optim,
                  "AdamW exp_avg + exp_avg_sq: 8 B × params" if optimizer == "adamw" else
                  f"Muon momentum 4 B × {matrices:,} block-matrix params + AdamW 8 B × the other {P - matrices:,}"),
        MemoryRow("activations", act_size, at_peak["activations"], act_formula),
        MemoryRow("  of which attention scores", (1 if grad_checkpointing else L) * scores,
                  _scores_at_peak(scores, at_peak["activations"], A_layer),
                  "B·h·T² per layer (eager kernel)" if attention == "eager"
                  else "not stored: fused SDPA keeps B·h·T log-sum-exp"),
        MemoryRow("autocast weight copies", head_copy + L * layer_copies, at_peak["autocast copies"],
                  "2 B × Linear weights (tied head included)" if amp else "none in fp32"),
        MemoryRow("embeddings + final norm", E, at_peak["embeddings + final norm"],
                  "ids, targets, ln_f input, lm_head input"),
        MemoryRow("logits + loss", log_probs + loss_grads, at_peak["logits + loss"],
                  ("fp32 d(logits) 4·B·T·V, computed in the forward" if fused_ce else "fp32 log-probs 4·B·T·V")
                  + (" + soft-cap tanh output 4·B·T·V" if softcap else "")
                  + (" + the soft-cap's input grad 4·B·T·V" if fused_ce and softcap else "" if fused_ce
                     else " + their grads 8·B·T·V") + " (the logits are not kept)"),
        MemoryRow("backward temporaries", max(e[1]["temporaries"] for e in events), at_peak["temporaries"],
                  "largest gradient buffers alive inside one op" + ("" if fused else "; foreach AdamW 4 B × params")),
    ]
    rows[5:5] = [MemoryRow(name, size, at_peak[name], fam.formulas[name]) for name, size in fam.saved.items()]
    if device == "cuda":
        rows.append(MemoryRow("cuBLAS workspace", overhead.workspace_bytes, overhead.workspace_bytes,
                              "allocated through PyTorch's caching allocator"))
    return MemoryEstimate(
        n_params=P, batch_size=B, seq_len=T, precision=precision, attention=attention,
        grad_checkpointing=grad_checkpointing, grad_accum_steps=grad_accum_steps, device=device,
        rows=rows, per_layer=per_layer, n_layer=L, saved_for_backward=saved_for_backward,
        model_state=weights + grads_full + optim, peak_allocated=peak, peak_phase=phase, optimizer=optimizer,
        overhead=over, total=peak + over,
        overhead_detail={"cuda_context": overhead.cuda_context_bytes if device == "cuda" else 0,
                         "allocator_slack": over - (overhead.cuda_context_bytes if device == "cuda" else 0)},
        phases=events,
    )


def _scores_at_peak(scores: int, acts_live: int, A_layer: int) -> int:
    if scores == 0 or A_layer == 0:
        return 0
    return int(scores * acts_live / A_layer) if acts_live >= A_layer else 0


def _fmt(n: int) -> str:
    return f"{n / GiB:.3g} GiB" if n >= GiB / 10 else f"{n / MiB:.3g} MiB"


# --------------------------------------------------------------------------------------
# Verdicts and advice
# --------------------------------------------------------------------------------------


def verdict(total_bytes: int, capacity_bytes: int) -> str:
    """``fits`` (at most :data:`TIGHT_FRACTION` of the card), ``tight`` (up to all of it) or
    ``does not fit``."""
    if total_bytes <= TIGHT_FRACTION * capacity_bytes:
        return "fits"
    if total_bytes <= capacity_bytes:
        return "tight"
    return "does not fit"


def max_batch_size(cfg: ModelConfig, capacity_bytes: int, *, limit: int = 1 << 20, **kwargs: Any) -> int:
    """Largest micro-batch whose :func:`estimate_memory` total is at most ``capacity_bytes``
    (0 when even one sequence does not fit). ``kwargs`` go to :func:`estimate_memory`."""
    def fits(b: int) -> bool:
        return estimate_memory(cfg, b, **kwargs).total <= capacity_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@dataclass(frozen=True)
class Suggestion:
    """One thing to try, with the estimate it would give and the flags that ask for it."""

    text: str
    total_bytes: int
    flags: str


def suggestions(cfg: ModelConfig, est: MemoryEstimate, capacity_bytes: int, *,
                bf16_supported: bool = True) -> list[Suggestion]:
    """What to try when ``est`` does not fit in ``capacity_bytes``, each re-estimated: 16-bit
    autocast, gradient checkpointing, the fused attention kernel, both, and a smaller micro-batch
    with ``grad_accum_steps`` keeping the tokens per optimizer step."""
    base = {"seq_len": est.seq_len, "precision": est.precision, "attention": est.attention,
            "grad_checkpointing": est.grad_checkpointing, "device": est.device, "optimizer": est.optimizer}
    out: list[Suggestion] = []

    def try_(text: str, flags: str, batch_size: int | None = None, **change: Any) -> None:
        total = estimate_memory(cfg, batch_size or est.batch_size, **{**base, **change}).total
        out.append(Suggestion(text, total, flags))

    half = "bf16" if bf16_supported else "fp16"
    if est.precision == "fp32":
        try_(f"{half} autocast", f"--{half}", precision=half)
    if est.attention == "eager":
        try_("fused SDPA attention (no T² scores)", "--attention sdpa", attention="sdpa")
    if not est.grad_checkpointing:
        try_("gradient checkpointing", "--grad-checkpointing", grad_checkpointing=True)
    if est.precision == "fp32" and not est.grad_checkpointing:
        try_(f"{half} + gradient checkpointing", f"--{half} --grad-checkpointing", precision=half,
             grad_checkpointing=True)
    best = max_batch_size(cfg, capacity_bytes, **base)
    if 0 < best < est.batch_size:
        per_step = est.batch_size * est.grad_accum_steps
        micro = max(b for b in range(1, best + 1) if per_step % b == 0)  # keeps the sequences per step
        accum = per_step // micro
        try_(f"micro-batch {micro} × grad_accum_steps {accum} (same {per_step} sequences per step)",
             f"--batch-size {micro} --set training.grad_accum_steps={accum}", batch_size=micro,
             grad_accum_steps=accum)
    return out


# --------------------------------------------------------------------------------------
# GPU memory sizes
# --------------------------------------------------------------------------------------

_UNITS = {"": GiB, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": MiB,
          "g": GB, "gb": GB, "gib": GiB, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_memory_size(text: str) -> int:
    """Bytes for ``16GiB``, ``16 GB`` (10⁹), ``24000MiB``, ``80G``; a bare number is GiB.

    Raises:
        ConfigError: not a positive number with a known unit (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB).
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text or "")
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 16GiB, 24GB or 81920MiB")
    return int(float(match.group(1)) * _UNITS[unit])


# --------------------------------------------------------------------------------------
# The WikiText GPT guide's hand table
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LegacyEstimate:
    """The WikiText GPT guide's "no optimisation" table (GB = 10⁹ bytes, fp32): rows in GB."""

    batch_size: int
    params_gb: float
    grads_gb: float
    adam_gb: float
    activations_gb: float
    attention_scores_gb: float
    overhead_gb: float
    total_gb: float


def legacy_seed001(n_params: int, batch_size: int, seq_len: int, n_embd: int, n_head: int, n_layer: int,
                   *, overhead_gb: float = 1.5) -> LegacyEstimate:
    """Reproduce the WikiText GPT guide's hand table (SEEDS_SPEC 5.3), its formula kept as written.

    params ``4P``, grads ``4P``, AdamW ``8P``; activations ``L · 4·(9·B·T·d + B·h·T²)`` bytes
    (9 = input 1 + QKV 3 + attention output 1 + FFN hidden 4; ``B·h·T²`` the attention
    scores); overhead 1.5 GB. GPT-2 small (P = 124,439,808, T 1024, d 768, h 12, L 12) gives
    11.04 / 18.59 / 33.69 GB at B = 8 / 16 / 32 (the seed's "0.99 GB" for AdamW is 0.9955
    truncated; rounded it is 1.00). It leaves out the logits, the second copy of
    the GELU activations and the LayerNorm inputs, and counts the T² scores a fused kernel never
    stores; :func:`estimate_memory` is the one to trust.
    """
    B, T, d, h, L = batch_size, seq_len, n_embd, n_head, n_layer
    scores = L * 4 * B * h * T * T
    acts = L * 4 * (9 * B * T * d + B * h * T * T)
    p = 4 * n_params
    total = 4 * p + acts + overhead_gb * GB
    return LegacyEstimate(B, p / GB, p / GB, 2 * p / GB, acts / GB, scores / GB, overhead_gb, total / GB)
