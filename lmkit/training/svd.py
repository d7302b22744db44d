"""The adaptive-SVD training hook: seed 003's driver (SEEDS_SPEC section 2), bugs fixed.

With ``svd.enabled``, every target layer (``svd.targets``: globs over the model's
:meth:`~lmkit.models.base.LanguageModel.target_modules` names) is swapped at the start of the
run for an :class:`~lmkit.models.svd_linear.AdaptiveSVDLinear` in full mode holding the same
weight, so nothing else changes until the first switch. Then, every ``svd.interval`` steps,
after backward and clipping and before the optimizer step (:meth:`after_backward`):

1. analyse each layer from its effective weight and the gradient of that weight
   (:func:`lmkit.models.svd_policy.analyse`: metrics 2.2, r update 2.3, decision 2.4); the
   first analysis of a layer only takes its snapshot (``initial_svd_computation``);
2. act: ``to_lowrank`` (freeze the top g - r components, train B, A of rank r, MiLoRA init),
   ``to_full`` (fold W_p + B·A back into W and train it), ``refactor`` (low-rank and the r
   update changed r: B, A re-factored at the new r from the effective weight -- the seed only
   recorded the new r), or ``keep``;
3. after a switch, rebuild the optimizer over the now-trainable parameters at the current LR
   (fresh, as the seed did, unless ``svd.keep_optimizer_state``) and skip that step's update
   (the seed's rule); after a re-factor, rebuild it keeping the other parameters' state and
   apply the step (the new factors have no gradient yet, so they do not move this step);
4. take the new snapshot (the SVD of the effective weight after the action).

Every analysis is an :class:`~lmkit.events.SVDAnalysis` event and a line of
``runs/NAME/svd.jsonl``; every switch also an :class:`~lmkit.events.SVDModeSwitch`. The
layers' mode, r, factors and snapshot are buffers and parameters of the model, so checkpoints
carry them and a resume rebuilds each layer at its checkpointed r before loading (the load
adapter of :mod:`lmkit.models.svd_linear`); this hook's own state is the switch history.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from lmkit.errors import ConfigError
from lmkit.events import Notice, SVDAnalysis, SVDModeSwitch
from lmkit.training.hooks import StepOutput, TrainingHook

if TYPE_CHECKING:  # pragma: no cover
    from lmkit.config.svd import SVDConfig
    from lmkit.training.loop import Trainer

#: The run-directory log of every analysis (one :meth:`SVDAnalysis.to_dict` per line).
SVD_LOG = "svd.jsonl"


def build_hook(config: SVDConfig, trainer: Trainer) -> AdaptiveSVDHook | None:
    """The hook for the ``svd:`` section, or ``None`` when ``svd.enabled`` is false.

    Raises:
        ConfigError: a target glob matches no module, or a matched module is not a linear layer.
    """
    if not config.enabled:
        return None
    return AdaptiveSVDHook(config, trainer)


def resolve_targets(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """The target module names the globs match, in the model's order.

    Raises:
        ConfigError: a glob matches nothing (the message lists some names that exist).
    """
    names = list(model.target_modules("all"))
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(f"svd.targets: {pattern!r} matches no layer of this model (layers: {sample}); "
                              "fix the glob with --set 'svd.targets=[...]'")
        chosen.extend(h for h in hits if h not in chosen)
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=order.__getitem__)


class AdaptiveSVDHook(TrainingHook):
    """Drives adaptive-SVD training (module docstring). Added by the trainer for ``svd:``."""

    name = "svd"

    def __init__(self, config: SVDConfig, trainer: Trainer):
        self.cfg = config
        self.thresholds = config.resolved_thresholds()
        self.targets = resolve_targets(trainer.model, config.targets)
        for name in self.targets:
            module = trainer.model.get_submodule(name)
            if type(module) is not torch.nn.Linear and not hasattr(module, "effective_weight"):
                # a subclass (the soft-capped head) computes more than x·Wᵀ + b: the low-rank
                # layer would silently drop it
                raise ConfigError(f"svd.targets: {name} is a {type(module).__name__}, not a plain linear layer; "
                                  "leave it out of svd.targets")
            if module is trainer.model.output_head() and trainer.model.tied_embeddings:
                raise ConfigError(f"svd.targets: {name} shares its weight with the token embedding (tied); "
                                  "freezing it would freeze the embedding: leave it out, or set "
                                  "model.tie_embeddings=false")
        self.switches: dict[str, int] = {n: 0 for n in self.targets}
        self.last_switch: dict[str, list[Any]] = {}
        self.analyses = 0
        self.analysing = False
        self.layers: dict[str, Any] = {}

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"switches": dict(self.switches), "last_switch": {k: list(v) for k, v in self.last_switch.items()},
                "analyses": self.analyses}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.switches.update({k: int(v) for k, v in dict(state.get("switches", {})).items()})
        self.last_switch = {k: list(v) for k, v in dict(state.get("last_switch", {})).items()}
        self.analyses = int(state.get("analyses", 0))

    def summary(self) -> dict[str, Any]:
        """``summary.json["svd"]``: per layer its mode and r at the end, switches and the last one."""
        return {"analyses": self.analyses, "layers": {
            name: {"mode": layer.mode, "r": layer.r, "switches": self.switches.get(name, 0),
                   "last_switch": self.last_switch.get(name)}
            for name, layer in self.layers.items()}}

    # -- the run -------------------------------------------------------------------------

    def on_start(self, trainer: Trainer) -> None:
        from lmkit.models.svd_linear import AdaptiveSVDLinear

        self.trainer = trainer
        for name in self.targets:
            module = trainer.model.get_submodule(name)
            if not isinstance(module, AdaptiveSVDLinear):  # a resume's load adapter swapped it already
                module = AdaptiveSVDLinear(module)  # the same weight Parameter: the optimizer stays valid
                trainer.model.swap_module(name, module)
            self.layers[name] = module
        self.log_path = trainer.run.path / SVD_LOG
        if trainer.step > 0:  # a resume: records of an abandoned continuation go to superseded/
            moved, aside = trainer.run.supersede_log_after(SVD_LOG, trainer.step)
            if aside is not None:
                trainer.emit(Notice(level="info", message=f"moved {moved} {SVD_LOG} record(s) past step "
                                                          f"{trainer.step} to {aside}"))
        t = self.thresholds
        modes = ", ".join(f"{n} {m.mode}" + (f" r={m.r}" if m.mode == "lowrank" else "")
                          for n, m in self.layers.items())
        trainer.emit(Notice(level="info", message=(
            f"adaptive SVD on {len(self.layers)} layer(s) every {self.cfg.interval} steps "
            f"(thresholds {self.cfg.thresholds}: principal_danger {t['principal_danger']}, minor_safe "
            f"{t['minor_safe']}, angle_stable {t['angle_stable']}, recon_safe {t['recon_safe']}): {modes}")))

    def before_step(self, trainer: Trainer) -> None:
        self.analysing = (trainer.step + 1) % self.cfg.interval == 0
        for layer in self.layers.values():
            layer.capture_grad = self.analysing
            if self.analysing:
                layer.reset_effective_grad()

    def after_backward(self, trainer: Trainer, step: StepOutput) -> None:
        if not self.analysing:
            return
        from lmkit.models.svd_policy import analyse

        switched = refactored = False
        records = []
        for name, layer in self.layers.items():
            started = time.perf_counter()
            a = analyse(layer, step.step, self.thresholds, self.cfg.warmup_steps, self.cfg.r_min, self.cfg.svd_device)
            metrics = dict(a.metrics)
            action = "snapshot" if a.reason == "initial_svd_computation" else "keep"
            mode_before, r_before = layer.mode, layer.r
            # the analysis's SVD is of the effective weight every action keeps (up to rounding):
            # one SVD per layer and analysis
            svd = a.svd if a.svd is not None else self.cfg.svd_device
            if a.want == "lowrank" and layer.mode == "full":
                before = layer.effective_weight()
                layer.switch_to_lowrank(a.r_next, svd=svd)
                metrics["milora_max_abs_diff"] = float((layer.effective_weight() - before).abs().max())
                action = "to_lowrank"
            elif a.want == "full" and layer.mode == "lowrank":
                layer.switch_to_full()
                action = "to_full"
            elif layer.mode == "lowrank" and a.r_next is not None and a.r_next != layer.r \
                    and a.reason not in ("no_gradient_yet", "invalid_gradient", "invalid_weight"):
                layer.refactor(a.r_next, svd=svd)
                action = "refactor"
            if action in ("to_lowrank", "to_full"):
                switched = True
                self.switches[name] += 1
                self.last_switch[name] = [step.step, a.reason]
            refactored = refactored or action == "refactor"
            if a.reason not in ("no_gradient_yet", "invalid_gradient", "invalid_weight"):
                layer.update_snapshot(svd=svd)
            layer.capture_grad = False
            layer.reset_effective_grad()  # an out x in buffer: not kept between analyses
            event = SVDAnalysis(step=step.step, layer=name, mode=mode_before, r=r_before, r_next=a.r_next,
                                metrics=metrics, reason=a.reason, action=action, mode_after=layer.mode,
                                r_after=layer.r, seconds=time.perf_counter() - started)
            records.append(event)
            trainer.emit(event)
            if action in ("to_lowrank", "to_full"):
                trainer.emit(SVDModeSwitch(step=step.step, layer=name, from_mode=mode_before, to_mode=layer.mode,
                                           r=layer.r, reason=a.reason, switches=self.switches[name]))
        self.analyses += 1
        with self.log_path.open("a", encoding="utf-8") as f:
            for event in records:
                f.write(json.dumps(event.to_dict()) + "\n")
        if switched:
            trainer.rebuild_optimizer(keep_state=self.cfg.keep_optimizer_state)
            step.applied = False  # the seed's rule: no update at the step of a switch
        elif refactored:
            trainer.rebuild_optimizer(keep_state=True)
        self.analysing = False


__all__ = ["SVD_LOG", "AdaptiveSVDHook", "build_hook", "resolve_targets"]
