"""What may change when a run is resumed.

A resumed run is rebuilt from its own ``config.yaml``. Changes that leave the model,
the data and the optimisation as they were -- how long to train, how often to
evaluate, log and checkpoint, where to run -- are allowed with ``--set`` (and the
flags) and recorded in ``events.jsonl``. Anything else (architecture, data, tokenizer,
batch size, learning rate or schedule shape, seed) would silently make a different
run, so it is an error naming the keys.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lmkit import __version__
from lmkit.config import RunConfig, build_run_config, read_yaml
from lmkit.errors import CheckpointError, ConfigError, DataError
from lmkit.training.checkpoint import checkpoint_paths, link_checkpoint, peek_step, save_checkpoint
from lmkit.training.schedule import LEGACY_WARMUP_FORM

#: What a checkpoint must hold to be resumed from.
CHECKPOINT_FORMAT_KEYS = ("model", "optimizer", "scheduler", "step", "micro_step", "rng")
#: Entries a sharded (DCP) folder holds as tensor shards, not in its ``extra``.
SHARDED_KEYS = ("model", "optimizer")

#: Keys a resume may change. Changing the length re-targets the LR schedule's end.
SAFE_KEYS = frozenset({
    "description",
    "data.cache_dir",
    "training.max_steps",
    "training.epochs",
    "training.eval_interval",
    "training.eval_every_epochs",
    "training.eval_iters",
    "training.eval_at_start",
    "training.log_interval",
    "training.checkpoint_interval",
    "training.checkpoint_every_epochs",
    "training.keep_last",
    "training.tensorboard",
    "training.device",
    "training.gpu_only",
    "training.compile",
    "training.tf32",
    "training.deterministic",
    "training.on_nan",
    "training.threads",  # allowed, but the continuation is then not bitwise (the trainer says so)
    "training.adapt_threads",  # opt-in load following (not bitwise once it changes the count)
})


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def config_changes(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``key -> (old, new)`` for every differing key (canonical dotted names)."""
    a, b = flatten(old.model_dump(mode="json")), flatten(new.model_dump(mode="json"))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def resume_config(config_path: Path, overrides: Iterable[str] = (),
                  flags: Mapping[str, tuple[str, Any]] | None = None) -> tuple[RunConfig, dict[str, tuple[Any, Any]]]:
    """The run's config with the allowed changes applied, and those changes.

    Raises:
        ConfigError: a change outside :data:`SAFE_KEYS`, naming every such key.
    """
    from lmkit.config import load_run_config

    old = load_run_config(config_path)
    overrides = list(overrides)
    if "warmup_form" not in ((read_yaml(config_path) or {}).get("training") or {}):
        # written before training.warmup_form existed: the run warmed up as s/W, the only form then
        old = old.model_copy(update={"training": old.training.model_copy(update={"warmup_form": LEGACY_WARMUP_FORM})})
        overrides.insert(0, f"training.warmup_form={LEGACY_WARMUP_FORM}")
    flags = {k: v for k, v in (flags or {}).items() if k not in ("name", "out_dir")}
    new = build_run_config(str(config_path), overrides, flags)
    new = new.model_copy(update={"name": old.name, "out_dir": old.out_dir, "preset": old.preset})
    changes = config_changes(old, new)
    if "training.parallelism" in changes:  # DDP keeps single files, FSDP DCP folders: one format per run
        old_p, new_p = changes["training.parallelism"]
        raise ConfigError(f"resume: training.parallelism {old_p or 'ddp'} -> {new_p or 'ddp'} is not supported (the "
                          f"run's checkpoints are {'DCP folders' if old_p == 'fsdp' else 'single files'}); resume "
                          f"{config_path.parent} with its own parallelism, or start a new run with --init-from")
    unsafe = [k for k in changes if k not in SAFE_KEYS]
    if unsafe:
        listed = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in unsafe)
        raise ConfigError(
            f"resume: {listed} would change the model, data or optimisation of {config_path.parent}; "
            f"start a new run instead (lmkit train --preset {config_path} --name NEW_NAME ...)"
        )
    return new, changes


# --------------------------------------------------------------------------------------
# Checks of a checkpoint against the run it resumes
# --------------------------------------------------------------------------------------


def check_checkpoint_config(state: Mapping[str, Any], config: RunConfig, path: Path) -> None:
    """The checkpoint must come from this run's model, data and optimisation: a
    hand-edited ``config.yaml`` or another run's checkpoint is refused, naming the keys.

    Raises:
        CheckpointError: no readable config in the checkpoint, or unsafe differences.
    """
    saved_dict = dict(state.get("config") or {})
    if "warmup_form" not in (saved_dict.get("training") or {}) and saved_dict.get("training"):
        # a checkpoint from before training.warmup_form warmed up as s/W, the only form then
        saved_dict["training"] = {**saved_dict["training"], "warmup_form": LEGACY_WARMUP_FORM}
    try:
        saved = RunConfig.model_validate(saved_dict)
    except Exception:  # noqa: BLE001 - an incompatible or missing config
        raise CheckpointError(f"{path}: holds no config this lmkit can read") from None
    ignore = {"name", "out_dir", "preset"}
    unsafe = {k: v for k, v in config_changes(saved, config).items() if k not in SAFE_KEYS | ignore}
    if unsafe:
        listed = ", ".join(f"{k} = {old!r} (now {new!r})" for k, (old, new) in unsafe.items())
        raise CheckpointError(
            f"{path}: was trained with {listed}; config.yaml was edited or the checkpoint is "
            "from another run -- restore the config or start a new run"
        )


def check_resumable(state: Mapping[str, Any], path: Path, *, data_fingerprint: str, dataset: str,
                    run_path: Path, tokenizer_fingerprint: str, tokenizer_dir: Path,
                    world_size: int = 1) -> list[str]:
    """Refuse a checkpoint this data or tokenizer cannot continue; return notes on version
    changes (the continuation may then differ in the last bits).

    Raises:
        CheckpointError: keys missing (a sharded folder: its ``extra`` and optimizer shards).
        DataError: the data or the tokenizer changed since the checkpoint.
    """
    manifest = state.get("manifest") or {}
    sharded = manifest.get("kind") == "lmkit-dcp"  # a DCP folder: state is its extra, the shards are loaded later
    missing = [k for k in CHECKPOINT_FORMAT_KEYS if k not in state and not (sharded and k in SHARDED_KEYS)]
    if sharded and not manifest.get("optimizer"):
        missing.append("optimizer")
    if missing:
        raise CheckpointError(f"{path}: cannot resume from it (missing {', '.join(missing)})")
    if state.get("data_fingerprint") not in (None, data_fingerprint):
        raise DataError(
            f"resume: the data of {run_path} changed since the checkpoint "
            f"({dataset} now tokenises differently); restore the original files or start a new run"
        )
    from lmkit.data.tokenizers import load_tokenizer

    if load_tokenizer(tokenizer_dir).fingerprint() != tokenizer_fingerprint:
        raise DataError(f"resume: {tokenizer_dir} differs from the tokenizer the data was "
                        "prepared with; the run cannot continue on these ids")
    notes = []
    for key, now in (("lmkit_version", __version__), ("torch_version", str(torch.__version__))):
        then = state.get(key)
        if then is not None and then != now:
            notes.append(f"checkpoint written by {key.split('_')[0]} {then}, now {now}: "
                         "the continuation may differ from an uninterrupted run in the last bits")
    return notes


def rescale_accumulation(state: Mapping[str, Any], path: Path, *, world_size: int, grad_accum_steps: int,
                         parallelism: str | None) -> tuple[int, str | None]:
    """The per-rank ``grad_accum_steps`` that keeps the checkpoint's global batch on
    ``world_size`` processes, and a note saying whether the continuation is bitwise.

    The global batch is ``W * grad_accum_steps * batch_size`` sequences and the ranks take
    interleaved micro-batches of one global order, so ``A_new = A_old * W_old / W_new`` takes
    the same micro-batches per step. It is not bitwise the uninterrupted run: the gradients are
    summed in another order. The note is ``None`` on one process resumed by one process.

    Raises:
        CheckpointError: ``A_old * W_old`` is not a multiple of ``W_new`` (one line).
    """
    written = int(state.get("world_size", 1))
    how = state.get("parallelism") or ("ddp" if written > 1 else "one process")
    if written == world_size:
        if world_size == 1:
            return grad_accum_steps, None
        return grad_accum_steps, (f"resumed on the {world_size} processes the checkpoint was written by ({how}): "
                                  "the continuation is bitwise the uninterrupted run")
    micro = grad_accum_steps * written  # global micro-batches per step
    if micro % world_size:
        raise CheckpointError(
            f"{path}: written by {written} {'process' if written == 1 else 'processes'} x {grad_accum_steps} "
            f"accumulation steps ({micro} micro-batches per step), which {world_size} processes cannot share "
            f"equally; resume it with a number of processes that divides {micro}")
    new = micro // world_size
    now = parallelism or ("ddp" if world_size > 1 else "one process")
    verb = "resharded by DCP" if state.get("manifest", {}).get("kind") == "lmkit-dcp" else "loaded"
    return new, (f"resumed on {world_size} {'process' if world_size == 1 else 'processes'} "
                 f"({now}) from a checkpoint "
                 f"of {written} ({how}), {verb}: training.grad_accum_steps {grad_accum_steps} -> {new} per rank keeps "
                 f"the global batch of {micro} micro-batches; the continuation is not bitwise the uninterrupted run "
                 "(the gradients are summed in another order)")


def align_checkpoints(checkpoints: Path, resume_path: Path, step: int, state: Mapping[str, Any]) -> list[Path]:
    """Resuming from anything but a complete ``latest`` (``.pt``, or a sharded run's ``.dcp``
    folder) of the newest step: move the
    checkpoints of later steps (an abandoned continuation) and unreadable ones to
    ``checkpoints/superseded/``, and make ``latest.pt`` the state resumed from, so that
    a crash before the next save resumes from here again. Returns the moved paths."""
    latest = checkpoints / f"latest{resume_path.suffix}"  # a sharded run's latest.dcp is a folder
    if resume_path == latest:
        return []
    aside = checkpoints / "superseded"
    moved = []
    for path in checkpoint_paths(checkpoints):
        if path == resume_path:
            continue
        saved_step = peek_step(path)
        if saved_step is None or saved_step > step:
            aside.mkdir(exist_ok=True)
            target = aside / path.name
            if os.path.lexists(target):
                target = aside / f"{path.stem}.{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}"
            os.replace(path, target)
            moved.append(target)
    if resume_path.parent == checkpoints or resume_path.is_dir():
        link_checkpoint(resume_path, latest)
    else:
        save_checkpoint({k: v for k, v in state.items() if k != "manifest"}, latest)
    return moved
