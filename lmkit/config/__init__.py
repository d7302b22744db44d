"""Run configuration: pydantic models, YAML presets and ``--set`` overrides.

A run is described by one :class:`RunConfig` with four parts -- ``model``
(the family's config, :class:`GPTConfig` for ``gpt``), ``data`` (:class:`DataConfig`), ``training``
(:class:`TrainConfig`) and a few run-level fields. Every model uses
``extra="forbid"``, so a misspelt key is an error, never silently ignored.

Configs are built from a preset (a YAML file under ``presets/``, chosen by name or
path), then ``--set key=value`` overrides, then the CLI's own flags
(:func:`build_run_config`). Any error becomes a :class:`~lmkit.errors.ConfigError`
whose one-line message names the key and where its value came from (the preset file,
the ``--set`` argument or the flag).

Keys use the nanoGPT / HF GPT-2 spelling (``n_layer``, ``n_head``, ``n_embd``,
``d_ff``, ``block_size``). The other spellings found in the seed experiments'
configs (``d_model``, ``num_heads``, ``num_layers``, ``max_seq_len``, ``depth``,
``tie_weights``, ``use_rope``) are accepted and rewritten to the canonical names.

Model families: ``model`` is a pydantic discriminated union on ``model.type`` (absent:
``gpt``), one config class per family, each ``extra="forbid"``: a key that only another
family has is an unknown key, with the usual one-line error. :class:`GPTConfig` (also
importable as ``ModelConfig``) is the ``gpt`` family's. A new family is one registration::

    class BackpackConfig(GPTConfig):          # or ModelConfigBase, with block_size/vocab_size
        type: Literal["backpack"] = "backpack"
        n_senses: int = Field(16, gt=0)

    register_model_family("backpack", "lmkit.models.backpack:Backpack", BackpackConfig)

which fills :data:`MODEL_FAMILIES` (name -> ``"module:Class"`` of the model, built by
:func:`lmkit.models.build_model`) and :data:`MODEL_CONFIGS` (name -> config class) and
rebuilds :class:`RunConfig`'s union, so presets, ``--set model.n_senses=4``, error messages
and ``config.yaml`` round trips work for it with no other change. The model class implements
:class:`lmkit.models.base.LanguageModel`.

This module never imports torch.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from lmkit.config.mixture import SourceConfig
from lmkit.errors import ConfigError

# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------

#: model.type -> "module:attribute" of the class built by :func:`lmkit.models.build_model`.
#: Kept here (as strings) so config validation knows the families without importing torch.
#: Filled by :func:`register_model_family` (``gpt`` -> ``lmkit.models.gpt:GPT``).
MODEL_FAMILIES: dict[str, str] = {}

#: model.type -> its config class (a :class:`ModelConfigBase`); filled by
#: :func:`register_model_family`. ``RunConfig.model`` is the discriminated union of these.
MODEL_CONFIGS: dict[str, type[BaseModel]] = {}

#: The family of a ``model`` section without a ``type`` key.
DEFAULT_MODEL_TYPE = "gpt"

#: Tokenizer names accepted by ``data.tokenizer`` (plus ``hf:NAME_OR_PATH``).
TOKENIZERS = ("char", "byte", "bpe", "gpt2", "gpt2+mul")

#: Data set names that are not paths: the built-in task and Hugging Face hub data sets.
BUILTIN_DATASETS = ("arithmetic",)
HUB_DATASETS = ("wikitext-2-raw-v1", "wikitext-103-raw-v1", "fineweb-edu", "europarl")

#: Other spellings of model keys -> canonical name (the arithmetic and WikiText experiments' configs, nanochat).
MODEL_KEY_ALIASES: dict[str, str] = {
    "d_model": "n_embd",
    "num_heads": "n_head",
    "n_heads": "n_head",
    "num_layers": "n_layer",
    "n_layers": "n_layer",
    "depth": "n_layer",
    "max_seq_len": "block_size",
    "seq_len": "block_size",
    "dim_feedforward": "d_ff",
    "ffn_dim": "d_ff",
    "tie_weights": "tie_embeddings",
    "tie_word_embeddings": "tie_embeddings",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


class ModelConfigBase(_Strict):
    """What every model family's config has in common.

    ``type`` is the family's name; each family's subclass narrows it to a ``Literal`` (the
    tag of the discriminated union, see :func:`register_model_family`). Each family also
    declares ``block_size`` (the longest context, tokens) and ``vocab_size`` (``None`` until
    the tokenizer sets it), which data preparation, training and generation read. Other
    spellings of keys (``d_model`` ...) are rewritten before validation
    (:func:`normalise_model_keys`).
    """

    type: str

    @model_validator(mode="before")
    @classmethod
    def _normalise_spellings(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return normalise_model_keys(dict(data))
        return data


class GPTConfig(ModelConfigBase):
    """Architecture of the ``gpt`` family (:class:`lmkit.models.gpt.GPT`).

    Shapes: token ids ``(B, T)`` with ``T <= block_size`` map to logits
    ``(B, T, vocab_size)``. ``d_ff`` defaults to ``4 * n_embd``; ``vocab_size`` defaults
    to the tokenizer's vocabulary (a larger value pads it, e.g. GPT-2's 50,257 -> 50,304).

    ``bias`` switches every Linear and LayerNorm bias; ``attn_bias`` / ``mlp_bias``
    override it for the attention projections (QKV and output) and the MLP, which is
    how the arithmetic experiment's model (no attention biases, MLP biases) is expressed.

    Options for nanochat's GPT (karpathy/nanochat ``nanochat/gpt.py``; the ``nanochat-d4``
    preset). Their defaults are GPT-2's, so a config that does not name them builds the
    same model, initialised bitwise the same:

    * ``norm``: ``layernorm`` (``nn.LayerNorm``) or ``rmsnorm`` (``F.rms_norm``, Zhang &
      Sennrich 2019), for ``ln_1``, ``ln_2``, ``ln_f`` (and ``ln_emb``). Both use
      ``layer_norm_eps``; nanochat calls ``F.rms_norm`` without ``eps``, which means
      ``torch.finfo(float32).eps`` = 1.1920928955078125e-07 on lmkit's fp32 residual stream
      (the preset sets that value).
    * ``norm_affine``: ``False`` makes every norm parameter-free (no gain, no bias): nanochat's
      "no learnable params in rmsnorm". ``True`` gives LayerNorm a gain (and a bias when
      ``bias``) and RMSNorm a gain (RMSNorm never has a bias).
    * ``qk_norm``: RMS-normalise each head's queries and keys over ``head_dim`` after the
      rotary rotation, without weights (eps ``layer_norm_eps``), as nanochat does.
    * ``embed_norm``: a norm (``transformer.ln_emb``, of the ``norm`` kind) right after the
      token (+ position) embedding, as nanochat's ``x = norm(wte(idx))``.
    * ``activation``: ``gelu`` (exact), ``gelu_tanh``, or ``relu2`` = ``relu(x)**2`` (So et al.
      2021, "Primer"; nanochat's MLP).
    * ``qkv``: ``fused`` (one ``c_attn`` of ``3·n_embd`` outputs, GPT-2) or ``separate``
      (``c_q``, ``c_k``, ``c_v``, nanochat); the same function and parameter count.
    * ``logit_softcap``: ``c`` -> logits ``c·tanh(logits / c)`` in float32, in generation and
      in the loss (Gemma 2; nanochat uses 15); ``None``: off.
    * ``init``: ``gpt2`` (N(0, ``init_std``), residual projections scaled by
      ``1/sqrt(2·n_layer)``) or ``nanochat`` (nanochat's ``_init_weights`` before its
      January 2026 rewrite: each Linear N(0, ``1/sqrt(fan_in)·min(1, sqrt(fan_out/fan_in))``),
      embeddings N(0, 1), ``lm_head`` and every ``c_proj`` zero; see
      :func:`lmkit.models.gpt_layers.init_nanochat`).
    """

    type: Literal["gpt"] = "gpt"
    n_layer: int = Field(4, gt=0)
    n_head: int = Field(4, gt=0)
    n_embd: int = Field(128, gt=0)
    d_ff: int | None = Field(None, gt=0)
    block_size: int = Field(256, gt=0)
    vocab_size: int | None = Field(None, gt=0)
    pos_encoding: Literal["learned", "rope"] = "learned"
    rope_theta: float = Field(10000.0, gt=0)
    activation: Literal["gelu", "gelu_tanh", "relu2"] = "gelu"
    bias: bool = True
    attn_bias: bool | None = None
    mlp_bias: bool | None = None
    tie_embeddings: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    layer_norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_affine: bool = True
    qk_norm: bool = False
    embed_norm: bool = False
    qkv: Literal["fused", "separate"] = "fused"
    logit_softcap: float | None = Field(None, gt=0)
    init: Literal["gpt2", "nanochat"] = "gpt2"

    @model_validator(mode="after")
    def _check_shapes(self) -> GPTConfig:
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_head={_nearest_divisor(self.n_embd, self.n_head)}"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2 != 0:
            raise ValueError(
                f"rotary positions need an even head size, but n_embd/n_head = {self.head_dim}"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ff_dim(self) -> int:
        """The MLP hidden size: ``d_ff`` or ``4 * n_embd``."""
        return self.d_ff if self.d_ff is not None else 4 * self.n_embd

    @property
    def use_attn_bias(self) -> bool:
        return self.bias if self.attn_bias is None else self.attn_bias

    @property
    def use_mlp_bias(self) -> bool:
        return self.bias if self.mlp_bias is None else self.mlp_bias

    @property
    def norm_numel(self) -> int:
        """Parameters of one norm: LayerNorm ``n_embd`` (+ ``n_embd`` bias when ``bias``),
        RMSNorm ``n_embd``, none when ``norm_affine`` is false."""
        if not self.norm_affine:
            return 0
        if self.norm == "rmsnorm":
            return self.n_embd
        return self.n_embd * (2 if self.bias else 1)


#: The GPT family's config under its historical name (``from lmkit.config import ModelConfig``).
ModelConfig = GPTConfig


def _model_type(value: Any) -> str | None:
    """The union's discriminator: ``model.type`` of a mapping (``gpt`` when absent) or of a
    config object; ``None`` (pydantic: "no tag") for anything else."""
    if isinstance(value, Mapping):
        return value.get("type", DEFAULT_MODEL_TYPE)
    return getattr(value, "type", None)


def _model_union() -> Any:
    """``Annotated[Union[Annotated[Cls, Tag(name)], ...], Discriminator(_model_type)]`` over
    :data:`MODEL_CONFIGS`."""
    members = tuple(Annotated[cls, Tag(name)] for name, cls in MODEL_CONFIGS.items())
    return Annotated[Union[members], Discriminator(_model_type)]  # noqa: UP007 - a runtime tuple


def register_model_family(name: str, model_class: str, config_class: type[ModelConfigBase]) -> None:
    """Make ``model.type: NAME`` build ``model_class`` from ``config_class``.

    Args:
        name: the family's ``model.type``.
        model_class: ``"module:Class"`` of a :class:`lmkit.models.base.LanguageModel`
            subclass taking the config (imported only when a model is built).
        config_class: a :class:`ModelConfigBase` subclass whose ``type`` field is
            ``Literal[NAME] = NAME`` and which has ``block_size`` and ``vocab_size`` fields.

    Raises:
        ValueError: the config class does not follow those rules.
    """
    field = config_class.model_fields.get("type")
    if field is None or field.default != name:
        raise ValueError(f"{config_class.__name__}.type must be Literal[{name!r}] = {name!r}")
    missing = [k for k in ("block_size", "vocab_size") if k not in config_class.model_fields]
    if missing:
        raise ValueError(f"{config_class.__name__} lacks {', '.join(missing)} (every family has them)")
    MODEL_FAMILIES[name] = model_class
    MODEL_CONFIGS[name] = config_class
    _rebuild_run_config()


def unregister_model_family(name: str) -> None:
    """Undo :func:`register_model_family` (for tests and plugins); ``gpt`` cannot be removed.

    Raises:
        ValueError: ``name`` is the default family.
    """
    if name == DEFAULT_MODEL_TYPE:
        raise ValueError(f"the default family {name!r} cannot be unregistered")
    MODEL_FAMILIES.pop(name, None)
    MODEL_CONFIGS.pop(name, None)
    _rebuild_run_config()


def _rebuild_run_config() -> None:
    """Point ``RunConfig.model`` at the union of the registered families (no-op before
    :class:`RunConfig` exists: its class body reads the registry itself)."""
    run = globals().get("RunConfig")
    if run is None:
        return
    fields = run.__pydantic_fields__
    fields["model"] = FieldInfo.from_annotated_attribute(_model_union(), Field(default_factory=GPTConfig))
    for section, cls in FEATURE_SECTIONS.items():
        fields[section] = FieldInfo.from_annotated_attribute(cls, Field(default_factory=cls))
    run.model_rebuild(force=True)


register_model_family("gpt", "lmkit.models.gpt:GPT", GPTConfig)


def _nearest_divisor(n: int, near: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - near), -d))


def normalise_model_keys(section: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the other spellings of model keys to the canonical ones.

    ``use_rope: true`` becomes ``pos_encoding: rope``. Giving both spellings of one key
    (``d_model`` and ``n_embd``) is an error.

    Raises:
        ValueError: when two spellings of the same key are both present.
    """
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in section.items():
        if key == "use_rope":
            canonical, value = "pos_encoding", ("rope" if value else "learned")
        else:
            canonical = MODEL_KEY_ALIASES.get(key, key)
        if canonical in out:
            raise ValueError(f"{spelled[canonical]!r} and {key!r} both set {canonical!r}; keep only {canonical!r}")
        out[canonical] = value
        spelled[canonical] = key
    return out


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


class ArithmeticConfig(_Strict):
    """The arithmetic experiment's built-in arithmetic task (see :mod:`lmkit.data.arithmetic`)."""

    seed: int = 42
    n_train: int = Field(2000, gt=0)
    n_val: int = Field(200, gt=0)
    n_test_flat: int = Field(100, ge=0)
    n_test_paren: int = Field(100, ge=0)
    max_depth: int = Field(2, ge=0, le=2)


class DataConfig(_Strict):
    """Where the tokens come from.

    ``dataset`` is ``arithmetic`` (built in), a local file or folder
    (``.txt``/``.raw``/any text, ``.jsonl``/``.json``, ``.parquet``; a folder of files
    named ``*train*``/``*valid*``/``*test*`` gives those splits), or a Hugging Face hub
    name (:data:`HUB_DATASETS`, or ``hf:owner/name``). A source without a validation
    split is split by rows: the last ``val_fraction`` becomes ``val``.
    """

    dataset: str = "arithmetic"
    tokenizer: str = "char"
    bpe_vocab_size: int = Field(8192, ge=260)
    encoding: str = "utf-8"
    text_field: str = "text"
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_tokens: int | None = Field(None, gt=0)
    cache_dir: str | None = None
    arithmetic: ArithmeticConfig = Field(default_factory=ArithmeticConfig)
    # Seed 004's multiplication-fact tokens (lmkit.data.mul_tokens): None = not that study.
    condition: Literal["baseline", "mul_tokens"] | None = None
    legacy_regex: bool = False
    include_synthetic: bool = False
    # A mixture of several datasets (lmkit.data.mixture); replaces ``dataset`` when given.
    sources: list[SourceConfig] | None = None
    # Chat / supervised fine-tuning data (lmkit.data.chat).
    format: Literal["text", "chat"] = "text"
    loss_on: Literal["assistant", "all"] = "assistant"
    inject_answers: bool = False
    legacy_pad_mask: bool = False

    @field_validator("tokenizer")
    @classmethod
    def _known_tokenizer(cls, value: str) -> str:
        if value in TOKENIZERS or (value.startswith("hf:") and len(value) > 3):
            return value
        close = difflib.get_close_matches(value, TOKENIZERS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown tokenizer {value!r} ({hint}known: {', '.join(TOKENIZERS)}, or hf:NAME_OR_PATH)"
        )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown text encoding {value!r} (e.g. utf-8, latin-1)") from None
        return value

    @model_validator(mode="after")
    def _task_tokenizer(self) -> DataConfig:
        if self.dataset == "arithmetic" and self.sources is None and self.tokenizer != "char":
            raise ValueError(
                f"the arithmetic task uses the 'char' tokenizer, not {self.tokenizer!r}; "
                "drop --tokenizer or set data.tokenizer=char"
            )
        return self


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------

Precision = Literal["fp32", "fp16", "bf16"]


class TrainConfig(_Strict):
    """Optimisation, schedule, precision, device and bookkeeping.

    Length: exactly one of ``max_steps`` (optimizer steps) or ``epochs`` (passes over
    the training split). One optimizer step sees ``batch_size * grad_accum_steps``
    sequences. Intervals are in optimizer steps unless named ``*_every_epochs``.
    Learning-rate schedules are described in :mod:`lmkit.training.schedule`;
    ``warmup_form`` is the warmup's multiplier after ``s`` of ``W`` steps: ``"s/W"`` (LR 0 at
    the first step; HF ``get_cosine_schedule_with_warmup``) or ``"(s+1)/W"`` (nanoGPT; the default).
    ``schedule: warmdown`` is nanochat's: constant, then linear over the last ``warmdown_ratio``
    of the steps to ``min_lr_ratio``.

    ``optimizer``: ``adamw`` (every parameter; ``lr``, ``betas``, ``eps``, ``weight_decay``) or
    ``muon``, nanochat's ``base_train.py`` setup (:func:`lmkit.training.optim.build_optimizer`):

    * ``torch.optim.Muon`` (Jordan et al. 2024) for every trainable 2-D matrix outside the
      embeddings and the output head (the blocks' weights) at LR ``lr`` (nanochat's
      ``matrix_lr`` 0.02), weight decay ``muon_weight_decay`` (0; torch's own default is 0.1),
      Nesterov ``muon_nesterov``, ``muon_ns_steps`` Newton-Schulz steps, and momentum warmed
      linearly from ``muon_momentum_start`` (0.85) to ``muon_momentum`` (0.95) over
      ``muon_momentum_warmup_steps`` (300) optimizer steps;
    * AdamW (``betas``, ``eps``, ``weight_decay``; nanochat: (0.8, 0.95), 1e-10, 0) for the
      embeddings at ``embedding_lr`` (0.2), the output head at ``head_lr`` (0.004), and any other
      parameter (biases, norm gains; nanochat's model has none) at ``head_lr``; the AdamW LRs are
      multiplied by ``(n_embd / lr_reference_width) ** -0.5`` (nanochat tuned them at 768 wide;
      ``null``: no scaling).
    """

    batch_size: int = Field(32, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    epochs: int | None = Field(None, gt=0)
    lr: float = Field(3e-4, gt=0)
    schedule: Literal["cosine", "linear", "constant", "warmdown"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_form: Literal["s/W", "(s+1)/W"] = "(s+1)/W"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmdown_ratio: float = Field(0.2, ge=0.0, le=1.0)
    optimizer: Literal["adamw", "muon"] = "adamw"
    embedding_lr: float = Field(0.2, gt=0)
    head_lr: float = Field(0.004, gt=0)
    lr_reference_width: int | None = Field(768, gt=0)
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0)
    muon_momentum_start: float = Field(0.85, ge=0.0, lt=1.0)
    muon_momentum_warmup_steps: int = Field(300, ge=0)
    muon_nesterov: bool = True
    muon_ns_steps: int = Field(5, gt=0, lt=100)
    muon_weight_decay: float = Field(0.0, ge=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, ge=0.0)
    #: The fused AdamW kernel (one launch for all parameters; it also skips a non-finite
    #: update on the device, without a host sync). ``None``: on CUDA and the CPU (not MPS).
    fused_optimizer: bool | None = None
    #: CPU threads of torch's intra-op pool. ``None``: the ``lmkit`` CLI's thread policy
    #: chooses (:mod:`lmkit.threads`). The count a run used is written here, so a resume
    #: uses the same (results differ in the last bits between thread counts).
    threads: int | None = Field(None, gt=0)
    #: Follow the CPU's load during the run: fewer threads while other processes keep cores busy,
    #: back up to ``threads`` when they stop (:mod:`lmkit.training.thread_adapt`). Off by default:
    #: a run that changed its count is not bitwise reproducible. CPU runs only.
    adapt_threads: bool = False
    precision: Precision = "fp32"
    device: str = "auto"
    gpu_only: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    #: Data parallelism under torchrun (WORLD_SIZE > 1): ``ddp`` (DistributedDataParallel; the
    #: default there) or ``fsdp`` (FSDP2 ``fully_shard`` per block, then the root; AdamW in fp32 or
    #: bf16; checkpoints are Distributed Checkpoint folders ``TAG.dcp``, also when such a run
    #: continues on one process). Set explicitly, it also applies to a launcher's single worker
    #: (``--nproc-per-node 1``): a process group of one, e.g. FSDP on one GPU.
    parallelism: Literal["ddp", "fsdp"] | None = None
    tf32: bool = True
    #: Deterministic kernels (``torch.use_deterministic_algorithms(True)``, cuBLAS workspace
    #: ``:4096:8``, cuDNN deterministic): on a GPU, two runs with the same seed -- and a run
    #: stopped and resumed -- are then bitwise the same, which GPU kernels with atomic adds
    #: (attention backward, index_add) are not by default; some speed is lost, and an op that has
    #: no deterministic kernel is an error. The CPU is deterministic either way.
    deterministic: bool = False
    seed: int = 1337
    log_interval: int = Field(10, gt=0)
    eval_interval: int | None = Field(None, gt=0)
    eval_every_epochs: int | None = Field(None, gt=0)
    eval_iters: int | None = Field(50, gt=0)
    eval_at_start: bool = True
    on_nan: Literal["abort", "skip"] = "abort"
    checkpoint_interval: int | None = Field(None, gt=0)
    checkpoint_every_epochs: int | None = Field(None, gt=0)
    keep_last: int | None = Field(3, ge=1)
    tensorboard: bool = True
    # Extra observers of the training events besides metrics.jsonl / events.jsonl / TensorBoard.
    loggers: list[Literal["tensorboard", "wandb"]] | None = None
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_run_name: str | None = None

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"betas must lie in [0, 1), got {list(value)}")
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value) is None:
            raise ValueError(f"unknown device {value!r} (auto, cuda, cuda:N, mps, cpu)")
        return value

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set either max_steps or epochs, not both")
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set max_steps or epochs (e.g. --max-steps 1000)")
        return self


# --------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------


#: Training features' config sections: section name (a top-level key of the run config,
#: e.g. ``svd``) -> its config class. Filled by :func:`register_feature`.
FEATURE_SECTIONS: dict[str, type[BaseModel]] = {}

#: section name -> ``"module:function"`` building the feature's training hook; the trainer
#: calls ``function(section_config, trainer)`` and adds what it returns (a
#: :class:`lmkit.training.hooks.TrainingHook`, or ``None`` when the feature is off). Kept as
#: strings so that config validation imports no training code.
FEATURE_HOOKS: dict[str, str] = {}


def register_feature(name: str, config_class: type[BaseModel], hook_factory: str | None = None) -> None:
    """Add a top-level config section ``name`` (validated by ``config_class``, default
    ``config_class()``) and, optionally, the training hook that runs it.

    A training feature is a config class, this registration and a hook (DESIGN.md: features
    are additions, not edits of the loop)::

        register_feature("svd", SVDConfig, "lmkit.training.svd:build_hook")

    After it, presets, ``--set svd.interval=10``, ``config.yaml`` round trips and the
    one-line unknown-key errors work for the section, and :class:`~lmkit.training.loop.Trainer`
    adds the hook ``hook_factory(run_config.svd, trainer)`` returns.

    Raises:
        ValueError: ``name`` is a built-in section, or ``config_class`` cannot be built with
            no arguments.
    """
    if name in ("name", "out_dir", "preset", "description", "source", "target_params", "model", "data",
                "training"):
        raise ValueError(f"{name!r} is a built-in section of the run config")
    config_class()  # every field needs a default: a run without the section gets the defaults
    FEATURE_SECTIONS[name] = config_class
    if hook_factory is None:
        FEATURE_HOOKS.pop(name, None)
    else:
        FEATURE_HOOKS[name] = hook_factory
    _rebuild_run_config()


class RunConfig(_Strict):
    """Everything needed to rebuild a run; written resolved to ``runs/NAME/config.yaml``.

    Besides the built-in sections, one section per registered training feature
    (:func:`register_feature`, e.g. ``svd``), each defaulting to its class's defaults.
    """

    name: str | None = None
    out_dir: str = "runs"
    preset: str | None = None
    description: str | None = None
    source: str | None = None
    target_params: int | None = Field(None, gt=0)
    model: _model_union() = Field(default_factory=GPTConfig)  # type: ignore[valid-type]
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainConfig
    # Start from another run's weights (``RUN[:CHECKPOINT]``) or a Hugging Face model
    # (``hf:PATH_OR_NAME``) with a fresh optimizer and schedule (lmkit.training.init_from).
    init_from: str | None = None
    # What init_from resolved to when the run started (path, checkpoint, step, tokenizer fingerprint...).
    init_source: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        if value is not None and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value) is None:
            raise ValueError(
                f"run name {value!r} may use only letters, digits, '.', '_' and '-' "
                "(and must not start with '.' or '-')"
            )
        return value

    def to_yaml(self) -> str:
        """The config as YAML with canonical key names (what ``config.yaml`` holds)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------
# Presets and overrides
# --------------------------------------------------------------------------------------


def presets_dir() -> Path:
    """The folder holding the shipped presets (``presets/`` of the repository): the checkout's
    own when this code runs from a source tree (another checkout on ``PYTHONPATH`` reads its
    presets, not those of the editable install), else the installed ``lmkit.presets``."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "presets" / "__init__.py").is_file():
        return root / "presets"
    try:
        path = Path(str(resources.files("lmkit.presets")))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - broken install
        pass
    return root / "presets"


def available_presets() -> dict[str, Path]:
    """Preset name -> YAML path, for every preset shipped with lmkit."""
    return {p.stem: p for p in sorted(presets_dir().glob("*.yaml"))}


def resolve_preset(name_or_path: str) -> Path:
    """The YAML file for ``--preset``: a shipped preset's name, or a path to a YAML file.

    Raises:
        ConfigError: unknown name, or a path that does not exist.
    """
    presets = available_presets()
    if name_or_path in presets:
        return presets[name_or_path]
    path = Path(name_or_path).expanduser()
    looks_like_path = path.suffix in (".yaml", ".yml") or "/" in name_or_path or "\\" in name_or_path
    if looks_like_path or path.exists():
        if path.is_dir():
            raise ConfigError(f"--preset {name_or_path}: is a folder; give a YAML file (or a preset name)")
        if not path.is_file():
            raise ConfigError(f"--preset {name_or_path}: no such file")
        return path
    hint = difflib.get_close_matches(name_or_path, list(presets), n=1)
    did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
    raise ConfigError(
        f"--preset {name_or_path}: unknown preset; {did_you_mean}available: {', '.join(presets)} "
        "(or give a path to a YAML file)"
    )


def read_yaml(path: Path) -> dict[str, Any]:
    """Load a YAML mapping from ``path``.

    Raises:
        ConfigError: unreadable file, invalid YAML (with the line), or not a mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {getattr(exc, 'start', '?')}); "
                          "save the YAML file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``--set`` argument, ``section.key=value``, into a key path and a value.

    The value is read as YAML, so ``3e-4``, ``true``, ``[0.9, 0.95]`` and ``null`` work.

    Raises:
        ConfigError: when the argument has no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. --set training.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        value = _maybe_number(value)
    return key.split("."), value


def _maybe_number(text: str) -> Any:
    # PyYAML (YAML 1.1) reads "3e-4" as a string; researchers write it that way.
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def build_run_config(
    preset: str | None = "pilot",
    overrides: Iterable[str] = (),
    flags: Mapping[str, tuple[str, Any]] | None = None,
) -> RunConfig:
    """Resolve preset, then ``--set`` overrides, then CLI flags into a validated config.

    Args:
        preset: a shipped preset name or a YAML path (``None``: defaults only).
        overrides: ``--set`` strings, ``"training.lr=3e-4"``; later ones win.
        flags: dotted key -> (flag label for messages, value), applied last, e.g.
            ``{"training.batch_size": ("--batch-size", 8)}``.

    Raises:
        ConfigError: one line naming the key and the file, override or flag at fault.
    """
    sources: dict[str, str] = {}
    if preset is not None:
        path = resolve_preset(preset)
        data = read_yaml(path)
        default_source = _display_path(path)
        data.setdefault("preset", path.stem)
    else:
        data, default_source = {}, "defaults"

    try:
        data = _normalise_sections(data)
    except ValueError as exc:
        raise ConfigError(f"{default_source}: model: {exc}") from None

    for text in overrides:
        path_parts, value = parse_override(text)
        if path_parts[0] == "model" and len(path_parts) == 2:
            path_parts[1] = MODEL_KEY_ALIASES.get(path_parts[1], path_parts[1])
            if path_parts[1] == "use_rope":
                path_parts[1], value = "pos_encoding", ("rope" if value else "learned")
        _set_path(data, path_parts, value)
        sources[".".join(path_parts)] = f"--set {text}"

    for dotted, (label, value) in (flags or {}).items():
        _set_path(data, dotted.split("."), value)
        sources[dotted] = label

    _one_length(data, sources)
    return validate_run_config(data, default_source, sources)


_LENGTH_KEYS = ("training.max_steps", "training.epochs")


def _one_length(data: dict[str, Any], sources: dict[str, str]) -> None:
    """``--set training.max_steps=N`` on an epoch-based preset replaces its ``epochs``
    (and the other way round) instead of failing as "both set"."""
    overridden = [k for k in _LENGTH_KEYS if k in sources and _get_path(data, k) is not None]
    if len(overridden) == 1:
        other = next(k for k in _LENGTH_KEYS if k != overridden[0])
        if _get_path(data, other) is not None:
            _set_path(data, other.split("."), None)


def _get_path(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _normalise_sections(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    if isinstance(data.get("model"), dict):
        data["model"] = normalise_model_keys(data["model"])
    return data


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def validate_run_config(
    data: Mapping[str, Any], default_source: str, sources: Mapping[str, str] | None = None
) -> RunConfig:
    """Validate a config mapping, turning pydantic errors into one :class:`ConfigError` line."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, default_source, sources or {})) from None


#: Keys read by each section-level validator, for blaming the right source.
_SECTION_CHECKS: dict[str, tuple[str, ...]] = {
    "model": ("model.n_embd", "model.n_head", "model.pos_encoding"),
    "data": ("data.dataset", "data.tokenizer"),
    "training": _LENGTH_KEYS,
}


def format_validation_error(
    exc: ValidationError, default_source: str, sources: Mapping[str, str]
) -> str:
    """One line per problem joined by '; ': ``SOURCE: KEY: what is wrong``.

    The model union's tag (``model.gpt.n_layer`` in pydantic's location) is left out of the key.
    """
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
        family = None
        if len(loc) >= 2 and loc[0] == "model" and loc[1] in MODEL_CONFIGS:
            family = loc.pop(1)
        if err["type"] in ("union_tag_invalid", "union_tag_not_found") and loc == ["model"]:
            loc.append("type")
        key = ".".join(loc)
        source = default_source
        for n in range(len(loc), 0, -1):
            prefix = ".".join(loc[:n])
            if prefix in sources:
                source = sources[prefix]
                break
        else:
            # A check over a whole section (n_embd vs n_head): blame the overrides of the
            # keys that check reads, if any; an unknown section (``--set trainin.lr=…``) the
            # overrides under it; otherwise the file.
            read = _SECTION_CHECKS.get(key, ())
            inside = [label for dotted, label in sources.items()
                      if dotted in read or (err["type"] == "extra_forbidden" and key and dotted.startswith(key + "."))]
            if inside:
                source = ", ".join(dict.fromkeys(inside))
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = _unknown_key_message(loc, family)
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown model type {err['ctx']['tag']!r} (known: {', '.join(MODEL_CONFIGS)})"
        elif err["type"] == "union_tag_not_found":
            msg = f"expected a mapping of model keys, got {err.get('input')!r}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] in ("greater_than", "greater_than_equal") and "input" in err:
            msg = f"must be {msg.removeprefix('Input should be ')}, got {err['input']!r}"
        elif "input" in err and err["type"] not in ("value_error", "assertion_error"):
            msg = f"{msg} (got {err['input']!r})"
        parts.append(f"{source}: {key}: {msg}" if key else f"{source}: {msg}")
    return "; ".join(parts)


def _unknown_key_message(loc: list[str], family: str | None = None) -> str:
    section_models: dict[str, type[BaseModel]] = {
        "model": MODEL_CONFIGS.get(family or DEFAULT_MODEL_TYPE, GPTConfig),
        "data": DataConfig,
        "training": TrainConfig,
        "arithmetic": ArithmeticConfig,
        **FEATURE_SECTIONS,
    }
    owner: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        owner = section_models.get(part, owner)
    known = list(owner.model_fields)
    hint = difflib.get_close_matches(loc[-1], known, n=1)
    if hint:
        return f"unknown key (did you mean {'.'.join([*loc[:-1], hint[0]])}?)"
    where = ".".join(loc[:-1]) or "the top level"
    return f"unknown key; {where} accepts: {', '.join(known)}"


def load_run_config(path: Path) -> RunConfig:
    """Load a run's resolved ``config.yaml`` (or any full config file).

    Raises:
        ConfigError: unreadable or invalid file, naming the key.
    """
    data = read_yaml(path)
    try:
        data = _normalise_sections(data)
    except ValueError as exc:
        raise ConfigError(f"{_display_path(path)}: model: {exc}") from None
    return validate_run_config(data, _display_path(path))


# --------------------------------------------------------------------------------------
# Built-in training features (each a config section and a hook; see register_feature)
# --------------------------------------------------------------------------------------

from lmkit.config.svd import SVDConfig  # noqa: E402  (needs _Strict above)

register_feature("svd", SVDConfig, "lmkit.training.svd:build_hook")

import lmkit.config.backpack  # noqa: E402,F401  (registers the backpack families)
import lmkit.config.senses  # noqa: E402,F401  (registers the senses: feature)
