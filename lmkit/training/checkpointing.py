"""The checkpoint policy as a training hook: when to save, under which tags, what to prune.

After every step's evaluation it saves ``latest`` when an evaluation ran, at the last
step, when a stop was requested, and whenever a tag is due: ``best`` (a new best
validation loss), ``step_NNNNNNN`` every ``training.checkpoint_interval`` steps and
``epoch_NNN`` every ``training.checkpoint_every_epochs`` epochs. The checkpoint is written
once and hard-linked under every tag (:meth:`lmkit.training.loop.Trainer.save`); of the
periodic ones, the newest ``training.keep_last`` of each kind are kept. A sharded run
(``training.parallelism: fsdp``) has a DCP folder per tag (``step_0002000.dcp/``), linked
file by file and pruned as a whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lmkit.rundir import parse_checkpoint_tag
from lmkit.training.checkpoint import checkpoint_paths
from lmkit.training.hooks import StepOutput, TrainingHook

if TYPE_CHECKING:  # pragma: no cover
    from lmkit.training.loop import Trainer


class CheckpointPolicy(TrainingHook):
    """Decides the tags of each save and prunes periodic checkpoints (``keep_last``)."""

    name = "checkpoint_policy"

    def __init__(self) -> None:
        self.periodic: dict[str, list[Path]] = {"step": [], "epoch": []}

    def on_start(self, trainer: Trainer) -> None:
        """Pick up the periodic checkpoints already on disk (a resume), oldest first."""
        epoch_now = trainer.micro_step // trainer.micro_per_epoch
        found: dict[str, list[tuple[int, Path]]] = {"step": [], "epoch": []}
        for path in checkpoint_paths(trainer.run.checkpoints):
            tag = checkpoint_tag(path)
            if tag and tag[1] <= (trainer.step if tag[0] == "step" else epoch_now):
                found[tag[0]].append((tag[1], path))
        self.periodic = {kind: [p for _, p in sorted(items)] for kind, items in found.items()}

    def tags(self, trainer: Trainer, step: StepOutput, evaluated: bool) -> list[str]:
        tcfg = trainer.config.training
        tags: list[str] = []
        if evaluated and trainer.last_val is not None and trainer.last_val.is_best:
            tags.append("best")
        if trainer.due(tcfg.checkpoint_interval):
            tags.append(f"step_{trainer.step:07d}")
        if trainer.crossed(tcfg.checkpoint_every_epochs, step.prev_micro_step):
            tags.append(f"epoch_{trainer.micro_step // trainer.micro_per_epoch:03d}")
        return tags

    def after_step(self, trainer: Trainer, step: StepOutput) -> None:
        evaluated = trainer.evaluator.evaluated_this_step
        tags = self.tags(trainer, step, evaluated)
        if tags or evaluated or trainer.step == trainer.max_steps or trainer.stopping:
            paths = trainer.save(["latest", *tags])
            self.prune(paths, trainer.config.training.keep_last)

    def prune(self, written: list[Path], keep: int | None) -> None:
        for path in written:
            tag = checkpoint_tag(path)
            if tag is None:
                continue
            kept = self.periodic[tag[0]]
            if path in kept:
                kept.remove(path)
            kept.append(path)
            while keep is not None and len(kept) > keep:
                remove_checkpoint(kept.pop(0))


def checkpoint_tag(path: Path) -> tuple[str, int] | None:
    """``("step", 2000)`` for ``step_0002000.pt`` or a sharded ``step_0002000.dcp`` folder (see
    :func:`lmkit.rundir.parse_checkpoint_tag`); ``None`` for ``latest``/``best``/anything else."""
    return parse_checkpoint_tag(f"{path.stem}.pt") if path.suffix in (".pt", ".dcp") else None


def remove_checkpoint(path: Path) -> None:
    """Delete a pruned checkpoint: a file, or a sharded folder (renamed away first, so a crash
    mid-delete leaves only a temporary folder, removed at the next resume)."""
    if path.is_dir():
        from lmkit.training.sharded import remove_checkpoint as remove_folder

        remove_folder(path)
    else:
        path.unlink(missing_ok=True)


__all__ = ["CheckpointPolicy", "checkpoint_tag", "remove_checkpoint"]
