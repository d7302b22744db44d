"""Model families and :func:`build_model`.

A family is registered by name in :data:`lmkit.config.MODEL_FAMILIES` as
``"module:Class"``; the class takes a :class:`~lmkit.config.ModelConfig` whose
``vocab_size`` is set. Later families (Backpack, adaptive-SVD GPT) add one line there
and a module here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lmkit.config import MODEL_FAMILIES, ModelConfig
from lmkit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def model_class(name: str) -> type[nn.Module]:
    """The class registered for ``model.type == name``.

    Raises:
        ConfigError: unknown family name.
    """
    try:
        target = MODEL_FAMILIES[name]
    except KeyError:
        raise ConfigError(f"model.type: unknown model type {name!r} (known: {', '.join(MODEL_FAMILIES)})") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def build_model(config: ModelConfig, *, device: str | None = None) -> nn.Module:
    """Build the model ``config.type`` names, with freshly initialised weights.

    Args:
        config: the model section; ``vocab_size`` must be resolved (not ``None``).
        device: where to allocate the parameters (``"meta"`` builds shapes only,
            which is how parameter counts of large presets are checked cheaply).

    Raises:
        ConfigError: unknown family, or ``vocab_size`` not set.
    """
    if config.vocab_size is None:
        raise ConfigError("model.vocab_size is not set (it is normally taken from the tokenizer)")
    cls = model_class(config.type)
    if device is None:
        return cls(config)
    import torch

    with torch.device(device):
        return cls(config)
