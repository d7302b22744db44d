"""Hugging Face GPT-2 / GPT-NeoX checkpoints -> lmkit's GPT: the inverse of ``lmkit export --to hf``.

:func:`import_hf_model` reads a ``GPT2LMHeadModel`` or ``GPTNeoXForCausalLM`` (a local
folder, or a hub name where the hub is reachable), maps its config to a
:class:`~lmkit.config.GPTConfig` (:func:`gpt_config_from_hf`) and its weights to lmkit's
module names, builds the :class:`~lmkit.models.gpt.GPT` and proves the two compute the same
function: ``max |Δ logit| < 1e-4`` in float32 on the CPU on a batch of random ids
(:func:`verify_import`), refusing the import otherwise.

Mappings (the inverse of :mod:`lmkit.export.hf`):

* GPT-2: ``Conv1D`` stores weights ``(in, out)``, ``nn.Linear`` ``(out, in)``: **every** one
  of ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj`` is transposed, whatever its
  shape (a square ``c_proj`` copied untransposed corrupts every attention layer silently;
  SEEDS_SPEC 1.6). ``n_positions`` -> ``block_size``, ``n_inner`` (``None``: 4·n_embd) ->
  ``d_ff``, ``activation_function`` ``gelu_new`` / ``gelu_pytorch_tanh`` -> ``gelu_tanh``,
  ``gelu`` -> ``gelu``, ``layer_norm_epsilon`` -> ``layer_norm_eps``, ``tie_word_embeddings``
  -> ``tie_embeddings``; GPT-2 always has biases (``bias: true``).
* GPT-NeoX: ``nn.Linear`` on both sides (no transpose); NeoX stores Q, K, V interleaved per
  head (``[q_0 k_0 v_0 | q_1 k_1 v_1 ...]``), lmkit stacks them (``[q | k | v]``), so the rows
  of ``query_key_value`` are regrouped. Rotary positions: NeoX rotates pairs
  ``(i, i + rot/2)`` ("rotate half") on the first ``rotary_pct`` of each head's dims with
  ``inv_freq = base^(-2i/rot)``; lmkit's :func:`lmkit.models.gpt.apply_rotary` is the same
  convention over the whole head, so only ``rotary_pct = 1`` maps. ``attention_bias`` ->
  ``attn_bias``; LayerNorm and MLP biases are always there (``bias: true``).

Refused in one line naming the key (:class:`~lmkit.errors.ConfigError`, exit 2): any other
``model_type``; GPT-NeoX ``use_parallel_residual: true`` (Pythia's
``x + attn(ln_1(x)) + mlp(ln_2(x))``; lmkit's block is sequential) and ``rotary_pct`` < 1
(Pythia's 0.25); rotary scaling (``rope_type`` other than ``default``); GPT-2 attention
without the ``1/sqrt(head_dim)`` scale or with the per-layer ``1/(layer+1)`` scale; cross
attention; activations lmkit lacks. Both of Pythia's options would be small additions to
the GPT family (a ``parallel_residual`` flag and a ``rotary_dims`` count).

``transformers`` is imported only inside these functions (the ``lmkit[hf]`` extra).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmkit.config import GPTConfig
from lmkit.errors import CheckpointError, ConfigError, first_line
from lmkit.models.hf_layout import CONV1D_WEIGHTS, stacked_qkv

if TYPE_CHECKING:
    import torch

    from lmkit.models.gpt import GPT

#: max |Δ logit| allowed between the imported model and the HF model (float32, CPU).
LOGIT_TOLERANCE = 1e-4

#: ``transformers`` ACT2FN name -> lmkit's ``model.activation`` computing the same function.
LMKIT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}

#: The HF architectures lmkit imports (``config.model_type``).
SUPPORTED_TYPES = ("gpt2", "gpt_neox")

INSTALL_HINT = 'init_from hf:... needs transformers: pip install "lmkit[hf]"'


@dataclass
class ImportedModel:
    """An HF checkpoint as an lmkit GPT.

    Attributes:
        model: the lmkit :class:`~lmkit.models.gpt.GPT` (float32, CPU, eval mode).
        config: its :class:`~lmkit.config.GPTConfig` (``vocab_size`` = the HF config's).
        hf_type: ``"gpt2"`` or ``"gpt_neox"``.
        hf_class: the HF model class name (``GPT2LMHeadModel`` ...).
        source: the folder loaded (resolved), or the hub name.
        max_abs_diff: max |Δ logit| against the HF model on the verification batch.
        offline: read with ``local_files_only`` (a folder, or a hub name from the cache).
    """

    model: GPT
    config: GPTConfig
    hf_type: str
    hf_class: str
    source: str
    max_abs_diff: float
    offline: bool = True


def require_transformers() -> Any:
    """Import ``transformers``.

    Raises:
        ConfigError: not installed (exit 2, with the install command).
    """
    try:
        import transformers
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return transformers


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


def _activation(hf_cfg: Any, key: str, where: str) -> str:
    name = getattr(hf_cfg, key)
    if name not in LMKIT_ACTIVATIONS:
        raise ConfigError(f"{where}: {key}={name!r} has no lmkit equivalent "
                          f"(lmkit imports {', '.join(LMKIT_ACTIVATIONS)})")
    return LMKIT_ACTIVATIONS[name]


def _neox_rotary(hf_cfg: Any) -> tuple[float, float, str]:
    """``(rotary fraction, theta, rope_type)`` from a GPTNeoXConfig of transformers 4.x or 5.x."""
    params = getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {}
    pct = params.get("partial_rotary_factor", getattr(hf_cfg, "rotary_pct", 1.0))
    theta = params.get("rope_theta", getattr(hf_cfg, "rotary_emb_base", getattr(hf_cfg, "rope_theta", 10000.0)))
    return float(pct), float(theta), str(params.get("rope_type", params.get("type", "default")))


def gpt_config_from_hf(hf_cfg: Any, *, where: str = "hf", dropout: float = 0.0) -> GPTConfig:
    """The :class:`~lmkit.config.GPTConfig` computing what the HF config's model computes.

    Args:
        hf_cfg: a ``transformers`` ``GPT2Config`` or ``GPTNeoXConfig``.
        where: names the source in error messages (``hf:PATH``).
        dropout: lmkit's ``model.dropout`` (HF's own dropouts are not carried over: a
            fine-tuning run chooses its own, 0 unless the config says otherwise).

    Raises:
        ConfigError: an architecture or option lmkit's GPT cannot represent exactly (one
            line naming the key).
    """
    model_type = getattr(hf_cfg, "model_type", None)
    if model_type == "gpt2":
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
            if bool(getattr(hf_cfg, key, want)) != want:
                raise ConfigError(f"{where}: GPT-2 {key}={str(not want).lower()} has no lmkit equivalent "
                                  f"(lmkit's attention is softmax(q·k/sqrt(head_dim)), self-attention only)")
        return GPTConfig(
            n_layer=hf_cfg.n_layer, n_head=hf_cfg.n_head, n_embd=hf_cfg.n_embd,
            d_ff=hf_cfg.n_inner if hf_cfg.n_inner is not None else 4 * hf_cfg.n_embd,
            block_size=hf_cfg.n_positions, vocab_size=hf_cfg.vocab_size, pos_encoding="learned",
            activation=_activation(hf_cfg, "activation_function", where), bias=True,
            tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", True)), dropout=dropout,
            layer_norm_eps=hf_cfg.layer_norm_epsilon, init_std=getattr(hf_cfg, "initializer_range", 0.02),
        )
    if model_type == "gpt_neox":
        if getattr(hf_cfg, "use_parallel_residual", True):
            raise ConfigError(f"{where}: GPT-NeoX use_parallel_residual=true (Pythia's x + attn(ln_1(x)) + "
                              "mlp(ln_2(x))) has no lmkit equivalent: lmkit's GPT block is sequential")
        pct, theta, rope_type = _neox_rotary(hf_cfg)
        if pct != 1.0:
            raise ConfigError(f"{where}: GPT-NeoX rotary_pct (partial_rotary_factor) = {pct:g} has no lmkit "
                              "equivalent: lmkit rotates every dimension of each head (rotary_pct 1.0)")
        if rope_type != "default":
            raise ConfigError(f"{where}: GPT-NeoX rope_type={rope_type!r} (scaled rotary positions) has no "
                              "lmkit equivalent")
        if hf_cfg.hidden_size % hf_cfg.num_attention_heads:
            raise ConfigError(f"{where}: hidden_size {hf_cfg.hidden_size} is not a multiple of "
                              f"num_attention_heads {hf_cfg.num_attention_heads}")
        return GPTConfig(
            n_layer=hf_cfg.num_hidden_layers, n_head=hf_cfg.num_attention_heads, n_embd=hf_cfg.hidden_size,
            d_ff=hf_cfg.intermediate_size, block_size=hf_cfg.max_position_embeddings, vocab_size=hf_cfg.vocab_size,
            pos_encoding="rope", rope_theta=theta, activation=_activation(hf_cfg, "hidden_act", where),
            bias=True, attn_bias=bool(getattr(hf_cfg, "attention_bias", True)), mlp_bias=True,
            tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)), dropout=dropout,
            layer_norm_eps=hf_cfg.layer_norm_eps, init_std=getattr(hf_cfg, "initializer_range", 0.02),
        )
    raise ConfigError(f"{where}: model_type {model_type!r} is not one lmkit imports "
                      f"(known: {', '.join(SUPPORTED_TYPES)}: GPT2LMHeadModel, GPTNeoXForCausalLM)")


def from_gpt2_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel`` state dict -> lmkit GPT state dict (the names are the same).

    Every name in :data:`CONV1D_WEIGHTS` is transposed from ``(in, out)`` to ``(out, in)``
    unconditionally. ``lm_head.weight`` is taken from ``transformer.wte.weight`` when tied.
    """
    out: dict[str, torch.Tensor] = {}
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "transformer.ln_f.bias"):
        out[key] = state[key]
    out["lm_head.weight"] = state["transformer.wte.weight"] if config.tie_embeddings else state["lm_head.weight"]
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            weight = state[p + part + ".weight"]
            if part + ".weight" in CONV1D_WEIGHTS:
                weight = weight.t()
            out[p + part + ".weight"] = weight.contiguous()
            out[p + part + ".bias"] = state[p + part + ".bias"]
    return out


def from_neox_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """``GPTNeoXForCausalLM`` state dict -> lmkit GPT state dict (QKV rows regrouped per head)."""
    head = state.get("lm_head.weight", state.get("embed_out.weight"))
    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": state["gpt_neox.embed_in.weight"],
        "transformer.ln_f.weight": state["gpt_neox.final_layer_norm.weight"],
        "transformer.ln_f.bias": state["gpt_neox.final_layer_norm.bias"],
        "lm_head.weight": state["gpt_neox.embed_in.weight"] if config.tie_embeddings else head,
    }
    for i in range(config.n_layer):
        src, dst = f"gpt_neox.layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm"),
                             ("mlp.c_fc", "mlp.dense_h_to_4h"), ("mlp.c_proj", "mlp.dense_4h_to_h")):
            out[f"{dst}{ours}.weight"] = state[f"{src}{theirs}.weight"]
            out[f"{dst}{ours}.bias"] = state[f"{src}{theirs}.bias"]
        out[dst + "attn.c_attn.weight"] = stacked_qkv(state[src + "attention.query_key_value.weight"], config.n_head)
        out[dst + "attn.c_proj.weight"] = state[src + "attention.dense.weight"]
        if config.use_attn_bias:
            out[dst + "attn.c_attn.bias"] = stacked_qkv(state[src + "attention.query_key_value.bias"], config.n_head)
            out[dst + "attn.c_proj.bias"] = state[src + "attention.dense.bias"]
    return out


def _resolve(name_or_path: str) -> tuple[str, bool]:
    """``(what to pass to from_pretrained, is_local)``.

    Raises:
        ConfigError: a path-like name (``/``, ``.``, ``~``) that is not a folder.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve()), True
    if path.exists() or name_or_path.startswith(("/", ".", "~")):
        raise ConfigError(f"hf:{name_or_path}: no such folder (give a folder written by save_pretrained "
                          "or lmkit export --to hf, or a hub name)")
    return name_or_path, False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's endpoint opens within ``timeout`` seconds
    (``HF_HUB_OFFLINE`` says no; behind a proxy the hub is assumed reachable). Without it an
    offline machine spends half a minute in ``huggingface_hub``'s retries."""
    import os
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        url = urlparse(constants.ENDPOINT)
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        url = urlparse("https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def load_hf_config(name_or_path: str) -> tuple[Any, str, bool]:
    """``(transformers config, source, use_local_files_only)`` of a folder or hub name (a
    hub name is read from the local HF cache when the hub is unreachable).

    Raises:
        ConfigError: transformers missing; no such folder; a hub name neither cached nor reachable.
    """
    require_transformers()
    from transformers import AutoConfig

    source, local = _resolve(name_or_path)
    offline = local or not hub_reachable()
    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(source, local_files_only=offline), source, offline
    except Exception as exc:  # noqa: BLE001 - no config.json, no network, no such repo: one line
        if local:
            raise ConfigError(f"hf:{name_or_path}: cannot read its config.json ({first_line(exc)})") from None
        why = "the hub is unreachable and it is not in the local cache" if offline else first_line(exc, 120)
        raise ConfigError(
            f"hf:{name_or_path}: not a local folder, and no model by that name ({why}); download it where "
            f"online (huggingface-cli download {name_or_path} --local-dir DIR) and pass --init-from hf:DIR") from None


def verify_import(model: GPT, hf_model: Any, *, seq_len: int = 256, seed: int = 0,
                  tolerance: float = LOGIT_TOLERANCE) -> float:
    """max |Δ logit| of ``model`` vs ``hf_model`` (both float32, CPU) on random ids
    ``(2, min(block_size, seq_len))``.

    Raises:
        CheckpointError: the difference is ``>= tolerance`` (or not finite).
    """
    import torch

    config = model.config
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, config.vocab_size, (2, min(config.block_size, seq_len)), generator=gen)
    with torch.no_grad():
        ours = model(idx)[0]
        theirs = hf_model(input_ids=idx).logits.float()
    if ours.shape != theirs.shape:
        raise CheckpointError(f"imported model: logits shape {tuple(ours.shape)} != HF {tuple(theirs.shape)}")
    diff = float((ours - theirs).abs().max())
    if not diff < tolerance:
        raise CheckpointError(f"imported model differs from the HF model: max |Δ logit| = {diff:.3g} >= "
                              f"{tolerance:g} in float32 (a weight mapping lmkit does not handle)")
    return diff


def import_hf_model(name_or_path: str, *, dropout: float = 0.0, verify: bool = True) -> ImportedModel:
    """Load an HF GPT-2 / GPT-NeoX checkpoint as an lmkit GPT and verify it.

    Args:
        name_or_path: a local folder (``config.json`` + weights) or a hub name.
        dropout: the lmkit model's ``dropout`` (see :func:`gpt_config_from_hf`).
        verify: compare logits with the HF model (:func:`verify_import`).

    Raises:
        ConfigError: transformers missing, no such folder, hub unreachable, or an
            unrepresentable architecture (one line naming the key).
        CheckpointError: the weights cannot be read or the logits differ.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from lmkit.models.gpt import GPT

    hf_cfg, source, offline = load_hf_config(name_or_path)
    where = f"hf:{name_or_path}"
    config = gpt_config_from_hf(hf_cfg, where=where, dropout=dropout)
    try:
        with _quiet_transformers():
            hf_model = AutoModelForCausalLM.from_pretrained(source, local_files_only=offline, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - missing or corrupt weights: one line
        raise CheckpointError(f"{where}: cannot load the weights ({first_line(exc)})") from None
    hf_model.eval()
    state = {k: v.detach().to("cpu", torch.float32) for k, v in hf_model.state_dict().items()}
    convert = from_gpt2_state_dict if config.pos_encoding == "learned" else from_neox_state_dict
    try:
        converted = convert(state, config)
    except KeyError as exc:
        raise CheckpointError(f"{where}: the weights lack {exc.args[0]} ({type(hf_model).__name__})") from None
    model = GPT(config)
    model.load_state_dict_flexible(converted)
    model.eval()
    diff = verify_import(model, hf_model) if verify else float("nan")
    return ImportedModel(model=model, config=config, hf_type=hf_cfg.model_type, hf_class=type(hf_model).__name__,
                         source=source, max_abs_diff=diff, offline=offline)


__all__ = ["CONV1D_WEIGHTS", "LOGIT_TOLERANCE", "ImportedModel", "from_gpt2_state_dict", "from_neox_state_dict",
           "gpt_config_from_hf", "hub_reachable", "import_hf_model", "load_hf_config", "verify_import"]
