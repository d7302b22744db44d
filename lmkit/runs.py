"""Load a trained run back for evaluation, export or analysis.

Everything that reads a finished (or running) run folder goes through :func:`load_run`:
the model is rebuilt from the checkpoint's own config (so a run whose ``config.yaml``
was edited afterwards still loads the architecture it was trained with), the weights are
verified against the checkpoint's manifest, and the tokenizer is rebuilt offline from
``runs/NAME/tokenizer/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lmkit.config import RunConfig
    from lmkit.data.tokenizers import Tokenizer
    from lmkit.rundir import RunDir


@dataclass
class LoadedRun:
    """A run's model (eval mode, on the requested device), tokenizer and checkpoint facts."""

    run: RunDir
    config: RunConfig  # the config stored in the checkpoint (vocab_size resolved)
    model: nn.Module
    tokenizer: Tokenizer
    checkpoint: Path  # the file that was loaded
    step: int  # optimizer steps done when the checkpoint was written
    tokens: int  # training tokens seen at that step
    val_loss: float | None  # the val loss measured at that step, if any (nats/token)
    state: dict[str, Any]  # the remaining checkpoint fields (no model/optimizer tensors)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The distinct checkpoints of a run as ``(step, path)``, oldest first.

    Single files (``*.pt``) and sharded folders (``*.dcp``, FSDP) alike. Periodic
    ``step_…``/``epoch_…`` ones come first; ``latest``/``best`` are added only when they hold
    a step no periodic one holds (they are hard links of one otherwise). Unreadable ones are
    skipped here; loading one later raises the usual error.
    """
    from lmkit.rundir import parse_checkpoint_tag
    from lmkit.training.checkpoint import checkpoint_paths, peek_step

    directory = run_dir / "checkpoints"
    by_step: dict[int, Path] = {}
    files = checkpoint_paths(directory)
    for path in sorted(files, key=lambda p: (parse_checkpoint_tag(f"{p.stem}.pt") is None, p.name)):
        step = peek_step(path)
        if step is not None and step not in by_step:
            by_step[step] = path
    return sorted(by_step.items())


def load_run(run: str | Path, checkpoint: str = "best", *, device: str | torch.device = "cpu",
             out_dir: str | Path = "runs", fold: bool = True) -> LoadedRun:
    """Rebuild a run's model from one of its checkpoints.

    Args:
        run: a run folder, or a run name under ``out_dir``.
        checkpoint: ``best``, ``latest``, ``step_…``/``epoch_…`` or a path to a ``.pt``
            file or ``.dcp`` folder (consolidated on load). ``best`` falls back to
            ``latest`` when the run never evaluated.
        device: where to put the model (it is returned in eval mode, fp32).
        fold: replace adaptive-SVD layers by plain linears holding their effective weight
            ``W_p + B·A`` (:func:`lmkit.models.svd_linear.fold_svd_layers`; the same logits),
            so that eval, generation, export and compare see an ordinary model. ``False``
            keeps them (``svd-analyze`` reads their mode and r).

    Raises:
        ConfigError: no such run (exit 2; the message lists the runs that exist).
        CheckpointError: the checkpoint is missing, corrupt or not an lmkit checkpoint.
        DataError: the run's tokenizer folder is missing or unreadable.
    """
    from lmkit.data.tokenizers import load_tokenizer
    from lmkit.rundir import RunDir
    from lmkit.training.init_from import load_run_checkpoint

    run_dir = RunDir.existing(run, out_dir)
    config, model, path, rest = load_run_checkpoint(run_dir, checkpoint, fold=fold)
    model.to(device).eval()
    tokenizer = load_tokenizer(run_dir.tokenizer_dir)
    last_val = rest.get("last_val") or {}
    val_loss = last_val.get("loss") if last_val.get("step") == rest["step"] else None
    return LoadedRun(run=run_dir, config=config, model=model, tokenizer=tokenizer, checkpoint=path,
                     step=int(rest["step"]), tokens=int(rest.get("tokens", 0)), val_loss=val_loss, state=rest)
