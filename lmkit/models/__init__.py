"""Model families and :func:`build_model`.

Every family implements the model interface :class:`lmkit.models.base.LanguageModel`
(forward with ``(logits | None, loss | None)``, FLOPs, parameter counts, KV-cache
generation, gradient checkpointing, per-head capture, target modules, flexible checkpoint
loading); code outside this package uses only that interface.

A family is registered with :func:`lmkit.config.register_model_family`, which records
``model.type`` -> ``"module:Class"`` in :data:`lmkit.config.MODEL_FAMILIES` and the
family's config class in :data:`lmkit.config.MODEL_CONFIGS`; the class takes that config
with ``vocab_size`` set. Later families (Backpack, adaptive-SVD GPT) add one registration
and a module here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lmkit.config import MODEL_FAMILIES, ModelConfigBase
from lmkit.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from lmkit.models.base import LanguageModel


def model_class(name: str) -> type[LanguageModel]:
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


def build_model(config: ModelConfigBase, *, device: str | None = None) -> LanguageModel:
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
