"""lmkit: train, resume, analyse, export and evaluate small transformer language models.

Importing ``lmkit`` is cheap: torch is imported only by the modules that need it
(models, training, data batching), never by the CLI entry point or the config layer.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
