"""The senses log of a Backpack run (the ``senses:`` section, :mod:`lmkit.config.senses`):
what the seed's "top activating words" meant to show (SEEDS_SPEC 4.2), computed from the
model's real senses (Hewitt et al., ACL 2023, arXiv 2305.16765).

Every ``senses.log_interval`` optimizer steps and at the last step, after the optimizer step:

1. **projection** -- for each query word (``senses.words``, mapped to tokens as in running
   text by :func:`lmkit.evaluation.senses.word_tokens`; a word of several tokens is logged
   per token) and each of the ``senses.n_frequent`` most frequent word tokens of the val
   split, per sense ℓ the ``top_k`` and bottom ``top_k`` vocabulary items by ``E·C(x)_ℓ``;
2. **activation** -- over the first ``senses.val_tokens`` tokens of the val split, per sense
   ℓ, the ``top_k`` source tokens by the weight ``Σ_i α_ℓ[i, j]`` they receive
   (``senses.activation``: the mean or max over a type's occurrences; types seen fewer than
   ``senses.min_count`` times are not ranked).

Records go to ``runs/NAME/senses.jsonl``, one per (step, kind, word token, sense)::

    {"step", "kind": "projection", "sense", "word", "token", "token_id", "items", "scores",
     "bottom_items", "bottom_scores"}          items: top-k pieces, scores: E·C(x)_ℓ (logits)
    {"step", "kind": "activation", "sense", "word": null, "items", "scores", "counts",
     "reduce"}                                  scores: Σ_i α_ℓ[i, j] (mean or max)

and ``runs/NAME/training_log.json`` keeps the seed's schema: ``iterations``, ``train_loss``
(the mean training loss of the steps since the previous evaluation), ``val_loss``,
``learning_rate`` (the last step's), one entry per evaluation, and ``top_activating_words``
``[{"iteration", "words": [{"sense", "token_id", "word", "activation"}]}]``, one entry per
log (each sense's top activating tokens). Both survive a resume: the log is part of this
hook's checkpoint state and ``senses.jsonl`` records past the resumed step are moved aside.

The log does not change training: it runs the uncompiled model in eval mode (dropout off)
under ``no_grad`` with the RNG states saved and restored, then puts the model back in train
mode; its sums are its own. A run on a model without senses stops at start (ConfigError).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmkit.errors import ConfigError
from lmkit.events import Notice
from lmkit.training.hooks import StepOutput, TrainingHook

if TYPE_CHECKING:  # pragma: no cover
    from lmkit.config.senses import SensesConfig
    from lmkit.events import EvalResult
    from lmkit.training.loop import Trainer

#: The run-directory log of every senses record.
SENSES_LOG = "senses.jsonl"
#: The seed's training log (SEEDS_SPEC 4.2 schema).
TRAINING_LOG = "training_log.json"


def build_hook(config: SensesConfig, trainer: Trainer) -> SensesHook | None:
    """The hook for the ``senses:`` section, or ``None`` while ``senses.log_interval`` is unset.

    Raises:
        ConfigError: the model has no senses, or the data is not a text (lm) run.
    """
    if config.log_interval is None:
        return None
    from lmkit.evaluation.senses import has_senses

    if not has_senses(trainer.model):
        raise ConfigError(f"senses.log_interval is set but model.type {trainer.config.model.type} has no senses "
                          "(a backpack has): unset it with --set senses.log_interval=null")
    if trainer.data.task != "lm":
        raise ConfigError("senses.log_interval: the senses log reads a text run's val split; this run's data "
                          f"is {trainer.data.task}")
    return SensesHook(config, trainer)


def _empty_log() -> dict[str, list]:
    return {"iterations": [], "train_loss": [], "val_loss": [], "learning_rate": [], "top_activating_words": []}


class SensesHook(TrainingHook):
    """Writes the senses log (module docstring). Added by the trainer for ``senses:``."""

    name = "senses"

    def __init__(self, config: SensesConfig, trainer: Trainer):
        from lmkit.evaluation.senses import frequent_word_tokens, word_tokens

        self.cfg = config
        tok = trainer.data.tokenizer
        val = np.asarray(trainer.data.tokens("val"))
        self.val = np.array(val[: config.val_tokens], dtype=np.int64)
        if len(self.val) < 2:
            raise ConfigError(f"senses: the val split has {len(self.val)} token(s); the activation pass needs 2 or more")
        self.queries: list[tuple[str, int, str]] = []  # (word, token id, piece)
        for word in config.words:
            self.queries += [(word, i, piece) for i, piece in word_tokens(tok, word)]
        for i in frequent_word_tokens(val, tok, config.n_frequent):
            if all(i != q[1] for q in self.queries):
                self.queries.append((tok.decode([i]).strip(), i, tok.decode([i])))
        self.log = _empty_log()
        self.loss_sum: torch.Tensor | None = None
        self.loss_steps = 0
        self.last_lr = math.nan
        self.logs = 0

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        loss_sum = None if self.loss_sum is None else float(self.loss_sum.item())
        return {"log": json.loads(json.dumps(self.log)), "logs": self.logs, "loss_sum": loss_sum,
                "loss_steps": self.loss_steps, "last_lr": self.last_lr}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.log = {**_empty_log(), **{k: list(v) for k, v in dict(state.get("log", {})).items()}}
        self.logs = int(state.get("logs", 0))
        loss_sum = state.get("loss_sum")
        self.loss_sum = None if loss_sum is None else torch.tensor(float(loss_sum), dtype=torch.float64)
        self.loss_steps = int(state.get("loss_steps", 0))
        self.last_lr = float(state.get("last_lr", math.nan))

    def summary(self) -> dict[str, Any]:
        """``summary.json["senses"]``: how many logs were written and of which words."""
        return {"logs": self.logs, "words": list(dict.fromkeys(q[0] for q in self.queries)), "file": SENSES_LOG}

    # -- the run -------------------------------------------------------------------------

    def on_start(self, trainer: Trainer) -> None:
        self.path = trainer.run.path / SENSES_LOG
        if trainer.step > 0:
            moved, aside = trainer.run.supersede_log_after(SENSES_LOG, trainer.step)
            if aside is not None:
                trainer.emit(Notice(level="info", message=f"moved {moved} {SENSES_LOG} record(s) past step "
                                                          f"{trainer.step} to {aside}"))
        trainer.emit(Notice(level="info", message=(
            f"senses log every {self.cfg.log_interval} steps -> {self.path}: "
            f"{len(self.queries)} word token(s), activation over {len(self.val):,} val tokens")))

    def after_step(self, trainer: Trainer, step: StepOutput) -> None:
        loss = step.loss.detach().double()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss.to(self.loss_sum.device)
        self.loss_steps += 1
        self.last_lr = float(step.lr)
        if trainer.due(self.cfg.log_interval) or trainer.step == trainer.max_steps:
            self.write_log(trainer)

    def on_eval(self, trainer: Trainer, result: EvalResult) -> None:
        train = float(self.loss_sum.item()) / self.loss_steps if self.loss_steps else math.nan
        self.log["iterations"].append(trainer.step)
        self.log["train_loss"].append(train if math.isfinite(train) else None)
        self.log["val_loss"].append(float(result.loss))
        self.log["learning_rate"].append(self.last_lr if math.isfinite(self.last_lr) else None)
        self.loss_sum, self.loss_steps = None, 0
        self._write_training_log(trainer)

    # -- the log -------------------------------------------------------------------------

    def records(self, trainer: Trainer) -> list[dict[str, Any]]:
        """This step's records (module docstring); the model is left as it was found."""
        from lmkit.evaluation.senses import activation_scores, sense_table, top_activating

        model, tok, cfg, step = trainer.model, trainer.data.tokenizer, self.cfg, trainer.step
        was_training = model.training
        dev = trainer.plan.device
        devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=True), torch.no_grad():
            model.eval()
            try:
                out = []
                for word, token_id, piece in self.queries:
                    for row in sense_table(model, tok, token_id, cfg.top_k):
                        out.append({"step": step, "kind": "projection", "sense": row["sense"], "word": word,
                                    "token": piece, "token_id": token_id, "items": row["top"],
                                    "scores": row["top_scores"], "bottom_items": row["bottom"],
                                    "bottom_scores": row["bottom_scores"]})
                scores, counts = activation_scores(model, self.val, trainer.config.model.block_size,
                                                   trainer.config.training.batch_size, cfg.activation)
                for sense, (ids, vals) in enumerate(top_activating(scores, counts, cfg.top_k, cfg.min_count)):
                    out.append({"step": step, "kind": "activation", "sense": sense, "word": None,
                                "items": [tok.decode([i]) for i in ids], "token_ids": ids, "scores": vals,
                                "counts": [int(counts[i]) for i in ids], "reduce": cfg.activation})
            finally:
                model.train(was_training)
        return out

    def write_log(self, trainer: Trainer) -> None:
        records = self.records(trainer)
        with self.path.open("a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        words = [{"sense": r["sense"], "token_id": i, "word": w, "activation": s}
                 for r in records if r["kind"] == "activation"
                 for i, w, s in zip(r["token_ids"], r["items"], r["scores"], strict=True)]
        self.log["top_activating_words"].append({"iteration": trainer.step, "words": words})
        self.logs += 1
        self._write_training_log(trainer)
        top = next((r for r in records if r["kind"] == "activation" and r["items"]), None)
        trainer.emit(Notice(level="info", message=(
            f"senses @ step {trainer.step}: {len(records)} record(s) -> {SENSES_LOG}"
            + (f"; sense {top['sense']} collects most on {', '.join(map(repr, top['items'][:3]))}" if top else ""))))

    def _write_training_log(self, trainer: Trainer) -> None:
        path = trainer.run.path / TRAINING_LOG
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.log, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)


__all__ = ["SENSES_LOG", "TRAINING_LOG", "SensesHook", "build_hook"]
