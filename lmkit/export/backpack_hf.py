"""``lmkit export RUN --to hf OUT`` for a ``backpack`` run: a Hugging Face folder that carries its
own modelling code, the way published Backpack checkpoints (``stanfordnlp/backpack-gpt2``)
are shared, and the proof that it computes what the run computes.

No architecture of the transformers library is a Backpack (Hewitt et al., ACL 2023, arXiv
2305.16765), so the folder holds ``configuration_backpack.py`` and ``modeling_backpack.py``
(copies of :mod:`lmkit.export.backpack_remote_configuration` and
:mod:`lmkit.export.backpack_remote_modeling`: torch + transformers only) and ``config.json``
names them in ``auto_map``; it loads with::

    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)

``model.safetensors`` holds the run's state dict under lmkit's own names (the remote model uses
them), the tied ``lm_head.weight`` left out (``_tied_weights_keys`` re-ties it). Every option
of the ``backpack`` family is represented (norm kind, norm without weights, QK-norm, embed
norm, ReLU², separate q/k/v, learned or rotary positions); generation recomputes the prefix
each step (no KV cache). Tested with transformers 5.x.

Verification as for GPT exports (:mod:`lmkit.export.hf`): the folder is loaded with
``trust_remote_code=True`` (local files only), and its float32 logits on real validation ids
and on random ids must be within ``1e-4`` of the native model's (after the same rounding for
a ``bfloat16``/``float16`` export); ``AutoTokenizer`` must encode the validation text to
lmkit's ids. ``backpack-legacy`` has no such folder: ``--to hf`` refuses it in one line
(:func:`lmkit.export.hf.hf_architecture`); ``--to safetensors`` exports it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmkit.errors import ConfigError, DataError, first_line
from lmkit.events import Event, Notice, null_emit
from lmkit.export import _folder

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from lmkit.config import ModelConfig
    from lmkit.data.tokenizers import Tokenizer
    from lmkit.export.hf import ExportResult
    from lmkit.runs import LoadedRun

#: The remote-code files: name in the export folder -> the module of lmkit.export it copies.
REMOTE_FILES = {"configuration_backpack.py": "backpack_remote_configuration.py",
                "modeling_backpack.py": "backpack_remote_modeling.py"}
HF_CLASS = "LmkitBackpackForCausalLM"
AUTO_MAP = {"AutoConfig": "configuration_backpack.LmkitBackpackConfig",
            "AutoModelForCausalLM": f"modeling_backpack.{HF_CLASS}"}


def backpack_hf_config(config: ModelConfig, tokenizer: Tokenizer | None = None) -> Any:
    """The remote ``LmkitBackpackConfig`` of a ``backpack`` model config, with ``auto_map``.

    Raises:
        ConfigError: not a ``backpack`` config.
    """
    from lmkit.export.backpack_remote_configuration import LmkitBackpackConfig
    from lmkit.export.hf import _special_ids

    if config.type != "backpack":
        raise ConfigError(f"model.type {config.type!r} is not a backpack")
    hf = LmkitBackpackConfig(
        vocab_size=config.vocab_size, n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
        n_senses=config.n_senses, sense_mlp_ratio=config.sense_mlp_ratio, block_size=config.block_size,
        d_ff=config.ff_dim, pos_encoding=config.pos_encoding, rope_theta=config.rope_theta,
        activation=config.activation, norm=config.norm, norm_affine=config.norm_affine, norm_bias=config.bias,
        attn_bias=config.use_attn_bias, mlp_bias=config.use_mlp_bias, layer_norm_eps=config.layer_norm_eps,
        qk_norm=config.qk_norm, qkv=config.qkv, embed_norm=config.embed_norm, dropout=config.dropout,
        tie_word_embeddings=True, architectures=[HF_CLASS], **_special_ids(tokenizer))
    hf.auto_map = dict(AUTO_MAP)
    return hf


def write_backpack_folder(model: nn.Module, config: ModelConfig, tokenizer: Tokenizer | None, folder: Path,
                          dtype: str = "float32") -> None:
    """Write ``config.json``, ``generation_config.json``, ``model.safetensors`` and the two
    remote-code files into ``folder`` (the tokenizer files are the caller's)."""
    import torch
    from safetensors.torch import save_file

    from lmkit.export.hf import _quiet_transformers, _special_ids
    from lmkit.training.checkpoint import clean_state_dict

    hf_cfg = backpack_hf_config(config, tokenizer)
    hf_cfg.dtype = dtype
    state = clean_state_dict(model.state_dict())
    state.pop("lm_head.weight", None)  # tied: transformers re-ties it from transformer.wte.weight
    save_file({k: v.detach().to("cpu", getattr(torch, dtype)).contiguous() for k, v in state.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    here = Path(__file__).parent
    for name, source in REMOTE_FILES.items():
        shutil.copyfile(here / source, folder / name)
    with _quiet_transformers():
        from transformers import GenerationConfig

        hf_cfg.save_pretrained(str(folder))
        GenerationConfig(**_special_ids(tokenizer)).save_pretrained(str(folder))


def load_remote(folder: Path, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``, local files,
    float32, quiet; ``kwargs`` go through (e.g. ``output_loading_info=True``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmkit.export.hf import _quiet_transformers

    with _quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True,
                                                    dtype=torch.float32, **kwargs)


def verify_backpack_folder(folder: Path, model: nn.Module, tokenizer: Tokenizer, sample_texts: list[str],
                           sample_ids: list[int], *, dtype: str = "float32", bos: bool | None = None) -> dict[str, Any]:
    """Load ``folder`` with its remote code and compare it with the native ``model``; the result
    has the keys of :func:`lmkit.export.hf.verify_hf_folder` (never raises for a mismatch)."""
    import torch
    from transformers import AutoTokenizer

    from lmkit.export.hf import LOGIT_TOLERANCE, _batches, rounded_copy
    from lmkit.export.tokenizer import check_prompt_ids

    problems: list[str] = []
    result: dict[str, Any] = {"tolerance": LOGIT_TOLERANCE, "compared_in": "float32 on cpu", "trust_remote_code": True}
    try:
        hf_model, info = load_remote(folder, output_loading_info=True)
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
    diffs: dict[str, float] = {}
    rounding = 0.0
    with torch.no_grad():
        reference = model.to("cpu", torch.float32).eval() if dtype != "float32" else None
        for name, idx in _batches(sample_ids, model.config.block_size, model.config.vocab_size).items():
            ours = native(idx)[0]
            theirs = hf_model(input_ids=idx).logits.float()
            if theirs.shape != ours.shape:
                problems.append(f"{name} ids: logits shape {tuple(theirs.shape)} != {tuple(ours.shape)}")
                continue
            diffs[name] = float((ours - theirs).abs().max())
            if reference is not None:
                rounding = max(rounding, float((reference(idx)[0] - ours).abs().max()))
    result["max_abs_diff"] = diffs
    if dtype != "float32":
        result["rounding_max_abs_diff"] = rounding
    for name, diff in diffs.items():
        if not diff < LOGIT_TOLERANCE:  # also catches NaN
            problems.append(f"{name} ids: max |Δ logit| = {diff:.3g} >= {LOGIT_TOLERANCE:g}")
    try:
        hf_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=True)
        mismatched = [t for t in sample_texts if hf_tok(t, add_special_tokens=False)["input_ids"] != tokenizer.encode(t)]
        result.update(check_prompt_ids(hf_tok, tokenizer, sample_texts, problems, bos=bos))  # BOS as lmkit
        result.update(tokenizer_texts=len(sample_texts), tokenizer_chars=sum(len(t) for t in sample_texts),
                      tokenizer_ids_equal=not mismatched)
        if mismatched:
            problems.append(f"tokenizer: {len(mismatched)} of {len(sample_texts)} validation texts encode to "
                            f"other ids than lmkit's (first: {mismatched[0][:40]!r})")
    except Exception as exc:  # noqa: BLE001
        result["tokenizer_ids_equal"] = False
        problems.append(f"AutoTokenizer.from_pretrained failed: {first_line(exc)}")
    result["passed"] = not problems
    result["problems"] = problems
    return result


def export_backpack_hf(loaded: LoadedRun, out: Path, *, dtype: str = "float32", verify: bool = True,
                       sample_text: Path | None = None, emit: Callable[[Event], None] = null_emit) -> ExportResult:
    """Write and verify the folder of a loaded ``backpack`` run (called by
    :func:`lmkit.export.hf.export_hf`, which checked ``dtype`` and ``out``).

    Raises:
        ExportError: verification failed; ``out`` is written and marked failed (exit 1).
    """
    from lmkit.export.hf import ExportResult, _source_metadata
    from lmkit.export.sample import validation_sample
    from lmkit.data import sequences_start_with_bos
    from lmkit.export.tokenizer import save_hf_tokenizer

    model_config = loaded.config.model
    emit(Notice("info", f"loaded {loaded.checkpoint} (step {loaded.step:,}) -> {HF_CLASS} (remote code), {dtype}"))
    sample, sample_error = None, None
    if verify:
        try:
            sample = validation_sample(loaded.config, loaded.tokenizer, sample_text=sample_text)
        except DataError as exc:
            sample_error = str(exc)
    metadata: dict[str, Any] = {
        "format": 1, "kind": "hf", "status": "unverified", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": _source_metadata(loaded), "architecture": "lmkit_backpack", "hf_class": HF_CLASS,
        "trust_remote_code": True, "dtype": dtype, "versions": _folder.versions(),
        "model": model_config.model_dump(mode="json"),
    }
    tmp = _folder.temp_folder(out)
    try:
        write_backpack_folder(loaded.model, model_config, loaded.tokenizer, tmp, dtype)
        bos = sequences_start_with_bos(loaded.config.data)  # a prompt starts as the run's sequences do
        metadata["tokenizer"] = save_hf_tokenizer(loaded.tokenizer, tmp, run_tokenizer_dir=loaded.run.tokenizer_dir,
                                                  model_max_length=model_config.block_size, bos=bos)
        emit(Notice("info", f"wrote {', '.join(sorted(p.name for p in tmp.iterdir()))}"))
        if not verify:
            metadata["verification"] = None
            _folder.write_json(tmp / _folder.METADATA_FILE, metadata)
            _folder.publish(tmp, out)
            return ExportResult(out, "unverified", metadata, sorted(p.name for p in out.iterdir()))
        if sample is None:
            verification: dict[str, Any] = {"passed": False, "problems": [sample_error]}
        else:
            emit(Notice("info", f"verifying: native vs transformers (trust_remote_code) logits on {sample.source}, "
                                f"and {len(sample.texts)} text(s) through both tokenizers"))
            verification = verify_backpack_folder(tmp, loaded.model, loaded.tokenizer, sample.texts, sample.ids,
                                                  dtype=dtype, bos=bos)
            verification["sample_source"] = sample.source
        _folder.conclude(tmp, out, metadata, verification)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, "verified", metadata, sorted(p.name for p in out.iterdir()))


__all__ = ["AUTO_MAP", "HF_CLASS", "backpack_hf_config", "export_backpack_hf", "load_remote",
           "verify_backpack_folder", "write_backpack_folder"]
