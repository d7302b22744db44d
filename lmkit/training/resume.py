"""What may change when a run is resumed.

A resumed run is rebuilt from its own ``config.yaml``. Changes that leave the model,
the data and the optimisation as they were -- how long to train, how often to
evaluate, log and checkpoint, where to run -- are allowed with ``--set`` (and the
flags) and recorded in ``events.jsonl``. Anything else (architecture, data, tokenizer,
batch size, learning rate or schedule shape, seed) would silently make a different
run, so it is an error naming the keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lmkit.config import RunConfig, build_run_config
from lmkit.errors import ConfigError

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
    "training.on_nan",
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
    flags = {k: v for k, v in (flags or {}).items() if k not in ("name", "out_dir")}
    new = build_run_config(str(config_path), list(overrides), flags)
    new = new.model_copy(update={"name": old.name, "out_dir": old.out_dir, "preset": old.preset})
    changes = config_changes(old, new)
    unsafe = [k for k in changes if k not in SAFE_KEYS]
    if unsafe:
        listed = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in unsafe)
        raise ConfigError(
            f"resume: {listed} would change the model, data or optimisation of {config_path.parent}; "
            f"start a new run instead (lmkit train --preset {config_path} --name NEW_NAME ...)"
        )
    return new, changes
