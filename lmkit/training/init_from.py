"""``init_from``: start a new run from trained weights, with a fresh optimizer and schedule.

Two kinds of source (``RunConfig.init_from``, ``lmkit train --init-from SPEC``):

* ``RUN[:CHECKPOINT]`` -- another lmkit run: a run folder, or a run name under ``out_dir``;
  ``CHECKPOINT`` is ``best`` (the default; ``latest`` when the run never evaluated),
  ``latest``, ``step_…``/``epoch_…`` or a path to a ``.pt`` file (or a sharded ``.dcp``
  folder, consolidated on load), as ``lmkit eval --checkpoint`` takes. Adaptive-SVD layers are folded into plain linears (the same logits).
* ``hf:PATH_OR_NAME`` -- a Hugging Face ``GPT2LMHeadModel`` / ``GPTNeoXForCausalLM`` (a local
  folder; a hub name where the hub is reachable), converted and verified by
  :mod:`lmkit.models.hf_import` (max |Δ logit| < 1e-4 in float32, else exit 2).

What the new run takes from the source (:func:`merge_config`), the way nanoGPT's
``init_from`` does:

* **the architecture**: the source's model section replaces the config's. A model key the
  config sets itself (in its preset or with ``--set``) must equal the source's, else exit 2
  naming the key -- except ``dropout``, ``init_std`` and ``init`` (they do not change the
  function of loaded weights; ``dropout`` is how fine-tuning regularises) and
  ``block_size``: shorter than the source's keeps the first positions of a learned position
  table (nanoGPT's ``crop_block_size``); longer is kept with rotary positions (they have no
  weights) and capped at the source's with learned ones, with a warning. A preset written
  for fine-tuning (``sft-gsm8k``) names no architecture, so it fits any source.
* **the tokenizer**: the source's (the run's ``tokenizer/`` folder, or the HF folder's
  ``tokenizer.json``) encodes the new data; a ``data.tokenizer`` the config sets to another
  name is refused. A run source's ``data.condition`` and ``data.legacy_regex`` are inherited
  unless the config sets them (fine-tuning a ``mul_tokens`` model injects its tokens).
* **nothing else**: optimizer, LR schedule, step counter, best val loss, RNG all start fresh.

The source is recorded: ``init_from`` keeps the spec, and :meth:`InitSource.record` (spec,
kind, resolved path, checkpoint, step, tokens, val loss, tokenizer kind and fingerprint; for
``hf:`` the HF class and the verified max |Δ logit|) is written to ``summary.json``
(``init_from``), the checkpoints (the :class:`InitRecord` hook's state, so a resume keeps it)
and the run header (a notice). A resumed fine-tuning run continues itself from its own
checkpoint and ``tokenizer/`` folder and never reads the source again.

A preset that only makes sense from trained weights sets ``init_from: "<required>"``
(:data:`INIT_REQUIRED`); training it without ``--init-from`` is an error (exit 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmkit.errors import CheckpointError, ConfigError, DataError, first_line
from lmkit.training.hooks import TrainingHook

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lmkit.config import ModelConfigBase, RunConfig
    from lmkit.data.tokenizers import Tokenizer
    from lmkit.rundir import RunDir

#: ``init_from`` of a preset that must be started from trained weights.
INIT_REQUIRED = "<required>"

#: Model keys a fine-tuning config may set differently from its source.
FREE_MODEL_KEYS = frozenset({"dropout", "init_std", "init"})

#: Data keys inherited from a run source unless the config sets them.
INHERITED_DATA_KEYS = ("condition", "legacy_regex")

__all__ = ["FREE_MODEL_KEYS", "INIT_REQUIRED", "InitRecord", "InitSource", "load_init_source", "load_init_weights",
           "load_run_checkpoint", "merge_config", "parse_spec"]


@dataclass
class InitSource:
    """The weights, architecture and tokenizer a run starts from.

    Attributes:
        spec: ``init_from`` as given.
        kind: ``"run"`` or ``"hf"``.
        path: the source run folder or HF folder (resolved), or the hub name.
        model_config: the source's architecture (``vocab_size`` set).
        state: the model's state dict (float32, CPU; SVD layers folded).
        tokenizer: the source's tokenizer.
        tokenizer_name: the ``data.tokenizer`` value it corresponds to.
        checkpoint / step / tokens / val_loss: the run checkpoint loaded (``None`` for ``hf:``).
        data_config: a run source's data section (``None`` for ``hf:``).
        extra: further facts for the record (``hf_class``, ``max_abs_diff``, ``exported_from``).
    """

    spec: str
    kind: str
    path: str
    model_config: ModelConfigBase
    state: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    tokenizer_name: str
    checkpoint: Path | None = None
    step: int | None = None
    tokens: int | None = None
    val_loss: float | None = None
    data_config: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """Plain-JSON facts for ``summary.json`` / ``config.yaml`` / the checkpoint."""
        return {
            "spec": self.spec, "kind": self.kind, "path": self.path,
            "checkpoint": str(self.checkpoint.resolve()) if self.checkpoint is not None else None,
            "checkpoint_name": self.checkpoint.stem if self.checkpoint is not None else None,
            "step": self.step, "tokens": self.tokens, "val_loss": self.val_loss,
            "tokenizer": self.tokenizer.kind, "tokenizer_fingerprint": self.tokenizer.fingerprint(),
            **self.extra,
        }

    def describe(self) -> str:
        """One line for the run header."""
        if self.kind == "run":
            what = f"{self.path} {self.checkpoint.name if self.checkpoint else ''} (step {self.step:,})"
        else:
            what = f"{self.path} ({self.extra.get('hf_class')}, max |Δ logit| {self.extra.get('max_abs_diff', 0):.1e})"
        return (f"init_from {self.spec}: weights of {what}, its architecture and {self.tokenizer.kind} tokenizer; "
                "optimizer and LR schedule start fresh at step 0")


def parse_spec(spec: str, out_dir: str | Path = "runs") -> tuple[str, str, str | None]:
    """``(kind, target, checkpoint)``: ``("hf", NAME, None)`` or ``("run", RUN, CHECKPOINT|None)``.

    ``RUN:CHECKPOINT`` is split at the last ``:`` unless the whole spec names a run.

    Raises:
        ConfigError: an empty spec, or the ``<required>`` placeholder of a preset.
    """
    spec = spec.strip()
    if spec == INIT_REQUIRED:
        raise ConfigError("this preset fine-tunes trained weights: pass --init-from RUN[:CHECKPOINT] (an lmkit run) "
                          "or --init-from hf:PATH (a Hugging Face GPT-2 / GPT-NeoX folder)")
    if not spec or spec == "hf:":
        raise ConfigError("init_from: empty; give RUN[:CHECKPOINT] or hf:PATH_OR_NAME")
    if spec.startswith("hf:"):
        return "hf", spec[3:], None
    if any((p / "config.yaml").is_file() for p in (Path(spec), Path(out_dir) / spec)):
        return "run", spec, None
    run, sep, checkpoint = spec.rpartition(":")
    if sep and run and checkpoint:
        return "run", run, checkpoint
    return "run", spec, None


def load_run_checkpoint(run_dir: RunDir, checkpoint: str = "best", *, fold: bool = True) -> tuple[
        RunConfig, nn.Module, Path, dict[str, Any]]:
    """``(config, model, path, state)`` of one checkpoint of a run (the core of
    :func:`lmkit.runs.load_run`): the model rebuilt from the checkpoint's own config, the
    weights loaded through the family's load adapters, SVD layers folded with ``fold``; CPU,
    float32, eval mode. ``state`` is the checkpoint without its tensors.

    Raises:
        CheckpointError: missing, corrupt, or not fitting its config.
    """
    from lmkit.config import RunConfig
    from lmkit.models import build_model
    from lmkit.training.checkpoint import existing_checkpoint, load_checkpoint

    path = existing_checkpoint(run_dir.checkpoints, checkpoint, run_dir.path, best_falls_back=True)
    state = load_checkpoint(path)
    config = RunConfig.model_validate(state["config"])
    model = build_model(config.model)
    try:
        model.load_state_dict_flexible(state["model"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if fold:
        from lmkit.models.svd_linear import fold_svd_layers

        fold_svd_layers(model)
    model.eval()
    rest = {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler", "scaler", "rng")}
    return config, model, path, rest


def _check_vocab(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(f"{where}: its tokenizer has {tokenizer.vocab_size:,} ids but the model only "
                              f"{vocab_size:,} rows; the tokenizer does not belong to these weights")


def _from_run(spec: str, target: str, checkpoint: str | None, out_dir: str | Path) -> InitSource:
    from lmkit.data.tokenizers import load_tokenizer
    from lmkit.rundir import RunDir

    run_dir = RunDir.existing(target, out_dir)
    config, model, path, state = load_run_checkpoint(run_dir, checkpoint or "best")
    tokenizer = load_tokenizer(run_dir.tokenizer_dir)
    _check_vocab(tokenizer, config.model.vocab_size, str(run_dir.path))
    last_val = state.get("last_val") or {}
    return InitSource(
        spec=spec, kind="run", path=str(run_dir.path.resolve()), model_config=config.model,
        state={k: v.detach().clone() for k, v in model.state_dict().items()}, tokenizer=tokenizer,
        tokenizer_name=config.data.tokenizer, checkpoint=path, step=int(state["step"]),
        tokens=int(state.get("tokens", 0)),
        val_loss=last_val.get("loss") if last_val.get("step") == state["step"] else None,
        data_config=config.data, extra={"run_name": run_dir.name, "preset": config.preset},
    )


def _hf_tokenizer(source: str, local: bool, offline: bool, where: str) -> Tokenizer:
    """The folder's ``tokenizer.json`` (or a fast tokenizer transformers builds from its files)."""
    from lmkit.data.tokenizers import HFTokenizer

    if local and (Path(source) / "tokenizer.json").is_file():
        return HFTokenizer.pretrained(source)
    try:
        from transformers import AutoTokenizer

        from lmkit.models.hf_import import _quiet_transformers

        with _quiet_transformers():
            hf_tok = AutoTokenizer.from_pretrained(source, local_files_only=offline)
    except Exception as exc:  # noqa: BLE001 - no tokenizer files: one line
        raise DataError(f"{where}: no tokenizer.json and no tokenizer files transformers reads "
                        f"({first_line(exc, 120)}); save the tokenizer into the folder") from None
    if not getattr(hf_tok, "is_fast", False):
        raise DataError(f"{where}: its tokenizer has no fast (tokenizers) version; save a tokenizer.json into it")
    return HFTokenizer(hf_tok.backend_tokenizer, f"hf:{source}", source)


def _from_hf(spec: str, name: str) -> InitSource:
    from lmkit.models.hf_import import import_hf_model

    imported = import_hf_model(name)
    where = f"hf:{name}"
    local = Path(imported.source).is_dir()
    tokenizer = _hf_tokenizer(imported.source, local, imported.offline, where)
    _check_vocab(tokenizer, imported.config.vocab_size, where)
    extra: dict[str, Any] = {"hf_class": imported.hf_class, "max_abs_diff": imported.max_abs_diff}
    meta = Path(imported.source) / "lmkit_export.json"
    if local and meta.is_file():
        try:
            extra["exported_from"] = (json.loads(meta.read_text(encoding="utf-8")).get("source") or {}).get("run")
        except (OSError, ValueError):
            pass
    return InitSource(spec=spec, kind="hf", path=imported.source, model_config=imported.config,
                      state=imported.model.state_dict(), tokenizer=tokenizer,
                      tokenizer_name=f"hf:{imported.source}", extra=extra)


def load_init_source(spec: str, *, out_dir: str | Path = "runs") -> InitSource:
    """Load what ``init_from: SPEC`` names (see the module docstring).

    Raises:
        ConfigError: no such run, the preset placeholder, transformers missing, an HF
            architecture lmkit cannot represent, an unreachable hub name.
        CheckpointError: a missing or corrupt checkpoint; HF weights that do not verify.
        DataError: the source's tokenizer cannot be rebuilt.
    """
    kind, target, checkpoint = parse_spec(spec, out_dir)
    if kind == "hf":
        return _from_hf(spec, target)
    return _from_run(spec, target, checkpoint, out_dir)


def _effective(config: Any, key: str) -> Any:
    if key == "d_ff" and hasattr(config, "ff_dim"):
        return config.ff_dim
    if key in ("attn_bias", "mlp_bias") and hasattr(config, f"use_{key}"):
        return getattr(config, f"use_{key}")
    return getattr(config, key, None)


def merge_config(config: RunConfig, source: InitSource) -> list[tuple[str, str]]:
    """Give ``config`` the source's architecture and tokenizer (in place); return the notes
    ``(level, message)`` for the run header.

    Raises:
        ConfigError: a model key the config sets differs from the source's (other than
            :data:`FREE_MODEL_KEYS` and ``block_size``), or ``data.tokenizer`` names another
            tokenizer (one line naming the key and what to do).
    """
    mine, theirs = config.model, source.model_config
    where = f"--init-from {source.spec}"
    origin = f"preset {config.preset}" if config.preset else "the config"
    explicit = set(mine.model_fields_set)
    for key in sorted(explicit - FREE_MODEL_KEYS - {"block_size"}):
        if key not in type(theirs).model_fields:
            raise ConfigError(f"model.{key}: the config sets it but {where} is a {theirs.type!r} model without it; "
                              f"drop model.{key} (the architecture comes from the source)")
        if _effective(mine, key) != _effective(theirs, key):
            raise ConfigError(
                f"model.{key}: {origin} gives {_effective(mine, key)!r} but {where} has "
                f"{_effective(theirs, key)!r}; the architecture comes from the source: drop model.{key} from the "
                "preset or --set (a fine-tuning preset such as sft-gsm8k names none; only dropout and block_size "
                "may differ)")
    update = {k: getattr(mine, k) for k in explicit & FREE_MODEL_KEYS if k in type(theirs).model_fields}
    notes: list[tuple[str, str]] = [("info", source.describe())]
    learned = getattr(theirs, "pos_encoding", "learned") == "learned"
    if "block_size" in explicit and mine.block_size != theirs.block_size:
        if mine.block_size < theirs.block_size:
            update["block_size"] = mine.block_size
            kept = f"; the first {mine.block_size} learned positions are kept" if learned else ""
            notes.append(("info", f"model.block_size {mine.block_size} (the source has {theirs.block_size}){kept}"))
        elif learned:
            notes.append(("warning", f"model.block_size {mine.block_size} is longer than the {theirs.block_size} "
                                     f"positions the source learned: using {theirs.block_size} "
                                     f"(--set model.block_size=N with N <= {theirs.block_size} silences this)"))
        else:
            update["block_size"] = mine.block_size
            notes.append(("warning", f"model.block_size {mine.block_size} is longer than the source's "
                                     f"{theirs.block_size}: rotary positions beyond it were never trained"))
    config.model = theirs.model_copy(update=update)

    data = config.data
    set_data = set(data.model_fields_set)
    if "tokenizer" in set_data and data.tokenizer != source.tokenizer_name:
        raise ConfigError(
            f"data.tokenizer: {origin} gives {data.tokenizer!r} but {where} was trained with "
            f"{source.tokenizer_name!r}; the source's tokenizer encodes the new data -- drop --tokenizer / "
            "data.tokenizer")
    try:
        data.tokenizer = source.tokenizer_name
        if source.data_config is not None:
            for key in INHERITED_DATA_KEYS:
                if key not in set_data and getattr(source.data_config, key, None) is not None:
                    setattr(data, key, getattr(source.data_config, key))
    except ValueError as exc:  # pydantic's ValidationError: e.g. the arithmetic task needs 'char'
        raise ConfigError(f"data: {where}'s tokenizer {source.tokenizer_name!r} does not fit this data "
                          f"({first_line(exc, 160)})") from None
    return notes


def load_init_weights(model: nn.Module, source: InitSource) -> None:
    """Copy the source's weights into ``model`` (built from the merged config). A shorter
    ``block_size`` keeps the first rows of a learned position table.

    Raises:
        CheckpointError: the weights do not fit (one line).
    """
    state = dict(source.state)
    block = getattr(model.config, "block_size", None)
    for key, value in state.items():
        if key.endswith("wpe.weight") and block is not None and value.shape[0] > block:
            state[key] = value[:block]
    try:
        model.load_state_dict_flexible(state)
    except CheckpointError as exc:
        raise CheckpointError(f"--init-from {source.spec}: {exc}") from None


class InitRecord(TrainingHook):
    """Carries :meth:`InitSource.record` in the checkpoints (so a resume keeps it) and into
    ``summary.json`` under ``init_from``."""

    name = "init_from"

    def __init__(self, record: dict[str, Any] | None = None):
        self.record = record

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.record is None else {"record": json.dumps(self.record)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("record"):
            self.record = json.loads(state["record"])

    def summary(self) -> dict[str, Any] | None:
        return self.record
