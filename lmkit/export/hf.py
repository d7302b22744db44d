"""Export a run to a Hugging Face folder, and prove the folder computes what the run computes.

Architectures (:func:`hf_architecture`):

* learned positions -> ``GPT2LMHeadModel``. GPT-2's ``Conv1D`` stores weights as
  ``(in, out)`` where ``nn.Linear`` stores ``(out, in)``, so **every** projection
  (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) is transposed, whatever
  its shape. (Transposing "when the shapes differ" skips the square ``attn.c_proj`` and
  silently corrupts every attention layer: domain-token-gpt2's bug, SEEDS_SPEC 1.6.)
* rotary positions -> ``GPTNeoXForCausalLM`` with ``rotary_pct = 1``, our ``rope_theta``,
  ``use_parallel_residual = False`` (our block is sequential pre-LN:
  ``x + attn(ln_1(x))`` then ``+ mlp(ln_2(.))``). NeoX rotates with the same "rotate half"
  convention as :func:`lmkit.models.gpt.apply_rotary` (pairs ``(i, i + head_dim/2)``,
  ``inv_freq = theta^(-2i/head_dim)``). NeoX stores Q, K, V interleaved per head
  (``[q_0 k_0 v_0 | q_1 k_1 v_1 ...]``), ours stacks them (``[q | k | v]``), so the rows of
  ``c_attn`` are regrouped.

nanochat's options of the GPT family (:class:`~lmkit.config.GPTConfig`: RMSNorm, norms without
weights, QK-norm, a norm after the embedding, ReLU², separate ``c_q``/``c_k``/``c_v``, a logit
soft-cap) have no counterpart in either architecture; :func:`hf_architecture` refuses such a
config in one line naming every such option (``--to safetensors`` exports it).

Parts our model may switch off but the HF architecture always has (GPT-2's biases,
NeoX's LayerNorm and MLP biases) are written as zeros, which computes the same function.
Activation names: exact GELU is ``gelu``, tanh GELU is ``gelu_new``.

Verification (:func:`verify_hf_folder`) loads the written folder with
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` (local files
only) and compares, in float32 on the CPU, the logits of the HF model with those of the
native model on a batch of real token ids from the run's validation data and a batch of
random ids: ``max |Δ logit| < 1e-4``. For a ``bfloat16``/``float16`` export the HF model is
loaded upcast to float32 and compared with the native model whose weights were rounded to
the same dtype, so the same 1e-4 bound checks the mapping; the effect of the rounding itself
(native fp32 vs rounded) is reported as ``rounding_max_abs_diff``, not judged. The HF
tokenizer must encode the run's validation text to the ids lmkit's tokenizer gives, and
``tokenizer(prompt)`` must give lmkit's prompt ids, BOS included (:func:`lmkit.export.tokenizer.check_prompt_ids`).
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmkit.errors import ConfigError, DataError, first_line
from lmkit.events import Event, Notice, null_emit
from lmkit.export import _folder
from lmkit.export._folder import ExportError  # noqa: F401  (re-exported: lmkit.export.hf.ExportError)
from lmkit.models.hf_layout import CONV1D_WEIGHTS, per_head_qkv

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lmkit.config import ModelConfig
    from lmkit.data.tokenizers import Tokenizer
    from lmkit.runs import LoadedRun

#: max |Δ logit| allowed between the native model and the exported HF model (float32, CPU).
LOGIT_TOLERANCE = 1e-4

#: Our activation -> the ``transformers`` ACT2FN name computing exactly the same function.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}

DTYPES = ("float32", "bfloat16", "float16")

INSTALL_HINT = 'lmkit export --to hf needs transformers: pip install "lmkit[hf]"'


@dataclass
class ExportResult:
    """What an export wrote.

    Attributes:
        out: the export folder.
        status: ``verified``, ``unverified`` (``--no-verify``) or ``failed``.
        metadata: the contents of ``lmkit_export.json``.
        files: names of the files in ``out``.
    """

    out: Path
    status: str
    metadata: dict[str, Any]
    files: list[str] = field(default_factory=list)


def require_transformers() -> Any:
    """Import ``transformers``.

    Raises:
        ConfigError: it is not installed (exit 2, with the install command).
    """
    try:
        import transformers
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return transformers


def hf_architecture(config: ModelConfig) -> str:
    """``"gpt2"`` (learned positions) or ``"gpt_neox"`` (rotary) for a model config.

    Raises:
        ConfigError: no HF architecture represents this model exactly (names why).
    """
    if config.type != "gpt":
        raise ConfigError(f"model.type {config.type!r} has no Hugging Face architecture that lmkit can export "
                          "to exactly; use --to safetensors")
    options = unexportable_options(config)
    if options:
        raise ConfigError(f"model options {', '.join(options)} have no exact Hugging Face equivalent "
                          "(GPT-2 / GPT-NeoX); use --to safetensors")
    if config.activation not in HF_ACTIVATIONS:
        raise ConfigError(f"model.activation {config.activation!r} has no exact Hugging Face equivalent; "
                          "use --to safetensors")
    if config.pos_encoding == "learned":
        return "gpt2"
    if config.pos_encoding == "rope":
        return "gpt_neox"
    raise ConfigError(f"model.pos_encoding {config.pos_encoding!r} has no exact Hugging Face equivalent; "
                      "use --to safetensors")


def unexportable_options(config: ModelConfig) -> list[str]:
    """The GPT options set to something neither GPT-2 nor GPT-NeoX computes, as ``key=value``
    (e.g. ``norm=rmsnorm``, ``qk_norm=true``); empty when the config is exportable. Separate
    ``c_q``/``c_k``/``c_v`` would map (by stacking), but the state-dict mappings here read the
    fused ``c_attn``."""
    out = []
    if getattr(config, "norm", "layernorm") != "layernorm":
        out.append(f"norm={config.norm}")
    if not getattr(config, "norm_affine", True):
        out.append("norm_affine=false")
    if getattr(config, "qk_norm", False):
        out.append("qk_norm=true")
    if getattr(config, "embed_norm", False):
        out.append("embed_norm=true")
    if config.activation not in HF_ACTIVATIONS:
        out.append(f"activation={config.activation}")
    if getattr(config, "qkv", "fused") != "fused":
        out.append(f"qkv={config.qkv}")
    if getattr(config, "logit_softcap", None) is not None:
        out.append(f"logit_softcap={config.logit_softcap:g}")
    return out


def _special_ids(tokenizer: Tokenizer | None) -> dict[str, int | None]:
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    eos = tokenizer.eos_id
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else eos
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tokenizer.pad_id}


def hf_config(config: ModelConfig, tokenizer: Tokenizer | None = None) -> Any:
    """The ``transformers`` config (``GPT2Config`` or ``GPTNeoXConfig``) of a model config.

    Raises:
        ConfigError: see :func:`hf_architecture`.
    """
    arch = hf_architecture(config)
    require_transformers()
    ids = _special_ids(tokenizer)
    act = HF_ACTIVATIONS[config.activation]
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=config.n_head, n_inner=config.ff_dim, activation_function=act,
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            layer_norm_epsilon=config.layer_norm_eps, initializer_range=config.init_std,
            scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
            tie_word_embeddings=config.tie_embeddings, architectures=["GPT2LMHeadModel"], **ids,
        )
    from transformers import GPTNeoXConfig

    neox = GPTNeoXConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, intermediate_size=config.ff_dim, hidden_act=act,
        max_position_embeddings=config.block_size, layer_norm_eps=config.layer_norm_eps,
        initializer_range=config.init_std, use_parallel_residual=False, attention_bias=config.use_attn_bias,
        attention_dropout=config.dropout, hidden_dropout=config.dropout, tie_word_embeddings=config.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, "partial_rotary_factor": 1.0},
        architectures=["GPTNeoXForCausalLM"], **ids,
    )
    # transformers 4.x reads these two keys (default rotary_pct 0.25 would silently differ).
    neox.rotary_pct = 1.0
    neox.rotary_emb_base = config.rope_theta
    return neox


def _zeros_or(state: dict[str, torch.Tensor], key: str, size: int) -> torch.Tensor:
    import torch

    value = state.get(key)
    return value if value is not None else torch.zeros(size, dtype=torch.float32)


def to_gpt2_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our GPT state dict (learned positions) -> ``GPT2LMHeadModel`` state dict.

    Every name in :data:`CONV1D_WEIGHTS` is transposed from ``(out, in)`` to ``(in, out)``
    unconditionally; missing biases (``bias``/``attn_bias``/``mlp_bias`` off) become zeros.
    """
    from lmkit.training.checkpoint import clean_state_dict

    state = clean_state_dict(state)
    d, ff = config.n_embd, config.ff_dim
    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": state["transformer.wte.weight"],
        "transformer.wpe.weight": state["transformer.wpe.weight"],
        "transformer.ln_f.weight": state["transformer.ln_f.weight"],
        "transformer.ln_f.bias": _zeros_or(state, "transformer.ln_f.bias", d),
        "lm_head.weight": state["lm_head.weight"],
    }
    bias_sizes = {"ln_1": d, "ln_2": d, "attn.c_attn": 3 * d, "attn.c_proj": d, "mlp.c_fc": ff, "mlp.c_proj": d}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        for part, size in bias_sizes.items():
            weight = state[p + part + ".weight"]
            if part + ".weight" in CONV1D_WEIGHTS:
                weight = weight.t()
            out[p + part + ".weight"] = weight.contiguous()
            out[p + part + ".bias"] = _zeros_or(state, p + part + ".bias", size)
    return out


def to_neox_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our GPT state dict (rotary positions) -> ``GPTNeoXForCausalLM`` state dict.

    ``nn.Linear`` on both sides (no transpose); the QKV rows are regrouped per head.
    Missing LayerNorm/MLP biases become zeros; attention biases follow ``attention_bias``.
    """
    from lmkit.training.checkpoint import clean_state_dict

    state = clean_state_dict(state)
    d, ff = config.n_embd, config.ff_dim
    out: dict[str, torch.Tensor] = {
        "gpt_neox.embed_in.weight": state["transformer.wte.weight"],
        "gpt_neox.final_layer_norm.weight": state["transformer.ln_f.weight"],
        "gpt_neox.final_layer_norm.bias": _zeros_or(state, "transformer.ln_f.bias", d),
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(config.n_layer):
        src, dst = f"transformer.h.{i}.", f"gpt_neox.layers.{i}."
        out[dst + "input_layernorm.weight"] = state[src + "ln_1.weight"]
        out[dst + "input_layernorm.bias"] = _zeros_or(state, src + "ln_1.bias", d)
        out[dst + "post_attention_layernorm.weight"] = state[src + "ln_2.weight"]
        out[dst + "post_attention_layernorm.bias"] = _zeros_or(state, src + "ln_2.bias", d)
        out[dst + "attention.query_key_value.weight"] = per_head_qkv(state[src + "attn.c_attn.weight"], config.n_head)
        out[dst + "attention.dense.weight"] = state[src + "attn.c_proj.weight"]
        if config.use_attn_bias:
            out[dst + "attention.query_key_value.bias"] = per_head_qkv(state[src + "attn.c_attn.bias"], config.n_head)
            out[dst + "attention.dense.bias"] = state[src + "attn.c_proj.bias"]
        out[dst + "mlp.dense_h_to_4h.weight"] = state[src + "mlp.c_fc.weight"]
        out[dst + "mlp.dense_h_to_4h.bias"] = _zeros_or(state, src + "mlp.c_fc.bias", ff)
        out[dst + "mlp.dense_4h_to_h.weight"] = state[src + "mlp.c_proj.weight"]
        out[dst + "mlp.dense_4h_to_h.bias"] = _zeros_or(state, src + "mlp.c_proj.bias", d)
    return out


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' logging at error level and no progress bars, restored afterwards."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def build_hf_model(model: nn.Module, config: ModelConfig, tokenizer: Tokenizer | None = None) -> Any:
    """A ``transformers`` model (float32, eval mode) holding ``model``'s weights.

    Raises:
        ConfigError: no exact HF architecture (see :func:`hf_architecture`).
        RuntimeError: the converted state dict does not fit the HF model (a bug in the mapping).
    """
    import torch
    from transformers import AutoModelForCausalLM

    hf_cfg = hf_config(config, tokenizer)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    converted = (to_gpt2_state_dict if hf_architecture(config) == "gpt2" else to_neox_state_dict)(state, config)
    with _quiet_transformers():
        hf_model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    expected = set(hf_model.state_dict())
    if config.tie_embeddings:
        expected.add("lm_head.weight")
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise RuntimeError(f"state dict mapping does not fit {type(hf_model).__name__}: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf_model.load_state_dict(converted, strict=False)
    if config.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


# --------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------


def _batches(ids: list[int], block_size: int, vocab_size: int, *, n_rows: int = 4,
             seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of real ids (``(rows, T)`` windows of ``ids``) and one of random ids ``(2, block_size)``."""
    import torch

    out: dict[str, torch.Tensor] = {}
    if len(ids) >= 2:
        t = min(block_size, len(ids))
        rows = max(1, min(n_rows, len(ids) // t))
        out["real"] = torch.tensor(ids[: rows * t], dtype=torch.long).view(rows, t)
    gen = torch.Generator().manual_seed(seed)
    out["random"] = torch.randint(0, vocab_size, (2, block_size), generator=gen)
    return out


def rounded_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A float32 copy of ``model`` whose parameters were rounded to ``dtype`` and back."""
    import torch

    clone = copy.deepcopy(model).to("cpu", torch.float32)
    if dtype != torch.float32:
        with torch.no_grad():
            for param in clone.parameters():
                param.copy_(param.to(dtype).to(torch.float32))
    return clone.eval()


def verify_hf_folder(folder: Path, model: nn.Module, tokenizer: Tokenizer, sample_texts: list[str],
                     sample_ids: list[int], *, dtype: str = "float32",
                     tolerance: float = LOGIT_TOLERANCE, legacy_hf_tokenizer: bool = False,
                     bos: bool | None = None) -> dict[str, Any]:
    """Load ``folder`` with transformers and compare it with the native ``model``.

    With a tokenizer that has the 45 mul tokens (``gpt2+mul``, either condition) the logits are
    also compared on a batch holding every mul id (:func:`lmkit.export.mul.mul_token_batch`, batch
    ``"mul"``), and the HF tokenizer is checked on :func:`lmkit.export.mul.mul_token_text`
    (:func:`lmkit.export.mul.check_mul_tokenizer`).

    Returns:
        ``{"passed", "max_abs_diff": {batch: float}, "tolerance", "rounding_max_abs_diff",
        "tokenizer_ids_equal", "tokenizer_texts", "loading": {...}, "problems": [str]}``
        (plus ``"mul_ids_in_batch"`` and ``"mul_tokens"`` for the mul study).
        Never raises for a mismatch: ``passed`` is false and ``problems`` says why.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    problems: list[str] = []
    result: dict[str, Any] = {"tolerance": tolerance, "compared_in": "float32 on cpu"}
    try:
        with _quiet_transformers():
            hf_model, info = AutoModelForCausalLM.from_pretrained(
                str(folder), local_files_only=True, dtype=torch.float32, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - any failure to load is a failed export
        return {**result, "passed": False, "problems": [f"AutoModelForCausalLM.from_pretrained failed: "
                                                         f"{first_line(exc)}"]}
    hf_model.eval()
    loading = {k: sorted(map(str, v)) for k, v in info.items() if isinstance(v, (list, set)) and v}
    result["loading"] = loading
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if loading.get(key):
            problems.append(f"from_pretrained reported {key}: {', '.join(loading[key][:4])}")
    native = rounded_copy(model, getattr(torch, dtype))
    reference = copy.deepcopy(model).to("cpu", torch.float32).eval()
    config = model.config
    diffs: dict[str, float] = {}
    rounding = 0.0
    from lmkit.export.mul import check_mul_tokenizer, mul_ids_in, mul_token_batch
    from lmkit.export.tokenizer import check_prompt_ids

    batches = _batches(sample_ids, config.block_size, config.vocab_size)
    mul_batch = mul_token_batch(tokenizer, config.block_size)
    if mul_batch is not None:
        batches["mul"] = mul_batch
        result["mul_ids_in_batch"] = mul_ids_in(mul_batch)
    with torch.no_grad():
        for name, idx in batches.items():
            ours = native(idx)[0]
            theirs = hf_model(input_ids=idx).logits.float()
            if theirs.shape != ours.shape:
                problems.append(f"{name} ids: logits shape {tuple(theirs.shape)} != {tuple(ours.shape)}")
                continue
            diffs[name] = float((ours - theirs).abs().max())
            if dtype != "float32":
                rounding = max(rounding, float((reference(idx)[0] - ours).abs().max()))
    result["max_abs_diff"] = diffs
    if dtype != "float32":
        result["rounding_max_abs_diff"] = rounding
    for name, diff in diffs.items():
        if not diff < tolerance:  # also catches NaN
            problems.append(f"{name} ids: max |Δ logit| = {diff:.3g} >= {tolerance:g}")
    try:
        with _quiet_transformers():  # "Token indices sequence length is longer than ..." on long texts
            hf_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            mismatched = [text for text in sample_texts
                          if hf_tok(text, add_special_tokens=False)["input_ids"] != tokenizer.encode(text)]
            result.update(check_prompt_ids(hf_tok, tokenizer, sample_texts, problems, bos=bos))  # BOS as lmkit
            if mul_batch is not None:
                result["mul_tokens"] = check_mul_tokenizer(hf_tok, tokenizer, problems, legacy_hf_tokenizer)
        result["tokenizer_texts"] = len(sample_texts)
        result["tokenizer_chars"] = sum(len(t) for t in sample_texts)
        result["tokenizer_ids_equal"] = not mismatched
        if mismatched:
            problems.append(f"tokenizer: {len(mismatched)} of {len(sample_texts)} validation texts encode to "
                            f"other ids than lmkit's (first: {mismatched[0][:40]!r})")
    except Exception as exc:  # noqa: BLE001 - any failure to load is a failed export
        result["tokenizer_ids_equal"] = False
        problems.append(f"AutoTokenizer.from_pretrained failed: {first_line(exc)}")
    result["passed"] = not problems
    result["problems"] = problems
    return result


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def _source_metadata(loaded: LoadedRun) -> dict[str, Any]:
    return {"run": str(loaded.run.path.resolve()), "run_name": loaded.run.name,
            "checkpoint": str(loaded.checkpoint.resolve()), "checkpoint_name": loaded.checkpoint.stem,
            "step": loaded.step, "tokens": loaded.tokens, "val_loss": loaded.val_loss,
            "preset": loaded.config.preset}


def export_hf(run: str | Path, out: str | Path, *, checkpoint: str = "best", dtype: str = "float32",
              verify: bool = True, force: bool = False, out_dir: str | Path = "runs",
              sample_text: Path | None = None, emit: Callable[[Event], None] = null_emit,
              legacy_hf_tokenizer: bool = False) -> ExportResult:
    """Write ``out`` as a Hugging Face model folder and (by default) verify it.

    Files: ``config.json``, ``model.safetensors``, ``generation_config.json``,
    ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` (and
    ``vocab.json``/``merges.txt`` for ``gpt2``), ``lmkit_export.json``.

    Args:
        run: run folder or name under ``out_dir``.
        checkpoint: ``best``, ``latest``, ``step_…``/``epoch_…`` or a path.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (the dtype of the saved weights).
        verify: compare the folder with the native model (see module docstring).
        force: replace a non-empty ``out``.
        sample_text: a text file to use instead of the run's validation data.
        legacy_hf_tokenizer: for a ``gpt2+mul`` run of the ``baseline`` condition, add the 47
            padding and 45 mul strings to the HF tokenizer as the seed's builder did (emits a
            warning: lmkit's own baseline tokenization then differs); see
            :func:`lmkit.export.tokenizer.save_hf_tokenizer`.

    Returns:
        An :class:`ExportResult` with status ``verified`` or ``unverified``.

    Raises:
        ConfigError: transformers missing, bad ``dtype``, unrepresentable model, ``out``
            non-empty without ``force`` (exit 2).
        CheckpointError / DataError: the run cannot be loaded (exit 2).
        ExportError: verification failed; ``out`` is written and marked failed (exit 1).
    """
    require_transformers()
    import torch

    from lmkit.export.sample import validation_sample
    from lmkit.data import sequences_start_with_bos
    from lmkit.export.tokenizer import save_hf_tokenizer
    from lmkit.runs import load_run

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: unknown dtype (choose {', '.join(DTYPES)})")
    out = Path(out)
    _folder.check_out(out, force)
    loaded = load_run(run, checkpoint, device="cpu", out_dir=out_dir)
    model_config = loaded.config.model
    if model_config.type == "backpack":  # its own modelling code (trust_remote_code)
        from lmkit.export.backpack_hf import export_backpack_hf

        return export_backpack_hf(loaded, out, dtype=dtype, verify=verify, sample_text=sample_text, emit=emit)
    arch = hf_architecture(model_config)
    if legacy_hf_tokenizer:
        from lmkit.export.mul import legacy_tokenizer_notice

        legacy_tokenizer_notice(loaded.tokenizer, emit)
    emit(Notice("info", f"loaded {loaded.checkpoint} (step {loaded.step:,}) -> "
                        f"{'GPT2LMHeadModel' if arch == 'gpt2' else 'GPTNeoXForCausalLM'}, {dtype}"))
    sample = None
    if verify:
        try:
            sample = validation_sample(loaded.config, loaded.tokenizer, sample_text=sample_text)
        except DataError as exc:
            sample_error: str | None = str(exc)
        else:
            sample_error = None
    metadata: dict[str, Any] = {
        "format": 1, "kind": "hf", "status": "unverified",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": _source_metadata(loaded),
        "architecture": arch, "hf_class": "GPT2LMHeadModel" if arch == "gpt2" else "GPTNeoXForCausalLM",
        "dtype": dtype, "versions": _folder.versions(),
        "model": loaded.config.model.model_dump(mode="json"),
    }
    tmp = _folder.temp_folder(out)
    try:
        hf_model = build_hf_model(loaded.model, model_config, loaded.tokenizer)
        hf_model.to(getattr(torch, dtype))
        with _quiet_transformers():
            hf_model.save_pretrained(str(tmp))
            from transformers import GenerationConfig

            GenerationConfig(**_special_ids(loaded.tokenizer)).save_pretrained(str(tmp))
        bos = sequences_start_with_bos(loaded.config.data)  # a prompt starts as the run's sequences do
        metadata["tokenizer"] = save_hf_tokenizer(loaded.tokenizer, tmp, run_tokenizer_dir=loaded.run.tokenizer_dir,
                                                  model_max_length=model_config.block_size,
                                                  legacy_hf_tokenizer=legacy_hf_tokenizer, bos=bos)
        emit(Notice("info", f"wrote {', '.join(sorted(p.name for p in tmp.iterdir()))}"))
        if not verify:
            metadata["verification"] = None
            _folder.write_json(tmp / _folder.METADATA_FILE, metadata)
            _folder.publish(tmp, out)
            return ExportResult(out, "unverified", metadata, sorted(p.name for p in out.iterdir()))
        if sample is None:
            verification = {"passed": False, "problems": [sample_error]}
        else:
            emit(Notice("info", f"verifying: native vs transformers logits on {sample.source}, "
                                f"and {len(sample.texts)} text(s) through both tokenizers"))
            verification = verify_hf_folder(tmp, loaded.model, loaded.tokenizer, sample.texts, sample.ids, dtype=dtype,
                                            legacy_hf_tokenizer=legacy_hf_tokenizer, bos=bos)
            verification["sample_source"] = sample.source
        _folder.conclude(tmp, out, metadata, verification)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, "verified", metadata, sorted(p.name for p in out.iterdir()))
