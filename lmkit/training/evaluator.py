"""In-training evaluation as a training hook.

Evaluates on the validation split every ``training.eval_interval`` steps, every
``training.eval_every_epochs`` epochs, at the last step, and once before the first step
when ``training.eval_at_start`` (the untrained baseline, never a "best"). Language-model
data: mean loss over the first ``eval_iters`` batches of windows, perplexity, and bits per
byte from the per-token byte counts stored with the shards
(:func:`lmkit.evaluation.perplexity.split_loss_sums`, what ``lmkit eval --task
perplexity`` computes too). Chat data: loss, perplexity and bits per byte over every
validation conversation (each target's bytes carried with it). Arithmetic data: loss and
perplexity over every validation sequence, plus flat / parenthesised accuracy.

Emits :class:`~lmkit.events.EvalResult`; the trainer's best-so-far (``best_val_loss``,
``best_step``) and ``last_val`` are updated here and saved with the train state.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from lmkit.data.batching import example_batches_in_order
from lmkit.errors import TrainingError
from lmkit.evaluation.arithmetic import arithmetic_metrics
from lmkit.evaluation.lm import mean_loss, perplexity
from lmkit.evaluation.perplexity import split_loss_sums
from lmkit.events import EvalResult
from lmkit.training.hooks import StepOutput, TrainingHook

if TYPE_CHECKING:  # pragma: no cover
    from lmkit.training.loop import Trainer


class Evaluator(TrainingHook):
    """Runs the validation evaluation when it is due (see the module docstring)."""

    name = "evaluator"

    def __init__(self) -> None:
        self.evaluated_this_step = False

    def on_start(self, trainer: Trainer) -> None:
        tcfg = trainer.config.training
        if tcfg.eval_at_start and trainer.step == 0:
            self.evaluate(trainer)

    def due(self, trainer: Trainer, step: StepOutput) -> bool:
        tcfg = trainer.config.training
        return (trainer.due(tcfg.eval_interval) or trainer.crossed(tcfg.eval_every_epochs, step.prev_micro_step)
                or trainer.step == trainer.max_steps)

    def after_step(self, trainer: Trainer, step: StepOutput) -> None:
        self.evaluated_this_step = False
        if self.due(trainer, step):
            self.evaluate(trainer)
            self.evaluated_this_step = True

    def evaluate(self, trainer: Trainer) -> EvalResult:
        """Evaluate now, emit the result and update the best-so-far.

        Raises:
            TrainingError: the validation loss is not finite.
        """
        cfg, plan, data = trainer.config, trainer.plan, trainer.data
        started = time.time()
        model = trainer.model
        dist = getattr(trainer, "dist", None)
        if dist is None or dist.is_main:  # several ranks: rank 0 evaluates and the others take its numbers
            if data.task in ("lm", "chat"):
                # text: the first eval_iters * batch_size full windows of the split; chat: every val
                # conversation; both with each target's original bytes
                limit = (cfg.training.eval_iters * cfg.training.batch_size
                         if cfg.training.eval_iters and data.task == "lm" else None)
                sums = split_loss_sums(model, data, "val", cfg.model.block_size, cfg.training.batch_size,
                                       plan.device, limit=limit, tail=False, vocab_size=cfg.model.vocab_size,
                                       autocast=plan.autocast)
                loss = sums.mean_loss
                metrics = {"ppl": perplexity(loss), "bpb": sums.bpb}
            else:
                pad = data.tokenizer.pad_id or 0
                batches = example_batches_in_order(data.sequences["val"], cfg.training.batch_size, pad)
                loss, _ = mean_loss(model, batches, plan)
                metrics = {"ppl": perplexity(loss), **arithmetic_metrics(
                    model, data.tokenizer, data.examples, plan, cfg.model.block_size)}
        else:
            loss, metrics = None, None
        if dist is not None and dist.enabled:
            loss, metrics = dist.broadcast_object((loss, metrics))
        if not math.isfinite(loss):
            raise TrainingError(f"validation loss is {loss} at step {trainer.step}; see {trainer.run.path}")
        # The step-0 evaluation of the untrained model is a baseline, not a "best".
        is_best = trainer.step > 0 and loss < trainer.best_val_loss
        if is_best:
            trainer.best_val_loss, trainer.best_step = loss, trainer.step
        result = EvalResult(step=trainer.step, epoch=trainer.epoch(), tokens=trainer.tokens, split="val",
                            loss=loss, metrics=metrics, is_best=is_best, elapsed_s=time.time() - started)
        trainer.last_val = result
        trainer.emit(result)
        trainer.hooks.call("on_eval", trainer, result)
        return result


__all__ = ["Evaluator"]
