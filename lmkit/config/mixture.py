"""``data.sources``: one entry of a data mixture (see :mod:`lmkit.data.mixture`).

Kept apart from :mod:`lmkit.config` so the data-mixture code owns its own schema; it
imports nothing from ``lmkit.config`` (which imports it).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SourceConfig(BaseModel):
    """One dataset of a mixture.

    Attributes:
        dataset: a local file or folder, or a hub name (as ``data.dataset``).
        fields: the fields of a JSON/JSONL/parquet row joined into the text (e.g.
            ``[question, answer]`` for GSM8K); ``None`` reads ``data.text_field``.
        weight: this source's share of the weighted part of the training split, relative to
            the other weighted sources and measured in UTF-8 bytes of text (token shares follow
            closely, whatever the tokenizer); the source with the least text per unit of weight
            is taken whole, the others subsampled, none repeated. ``None`` takes the whole
            source once. Validation and test splits are always whole.
        val_fraction: this source's own split rule when it has no validation split
            (``None``: ``data.val_fraction``).
        encoding: text encoding of local files (``None``: ``data.encoding``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dataset: str
    fields: list[str] | None = None
    weight: float | None = Field(None, gt=0)
    val_fraction: float | None = Field(None, gt=0.0, lt=1.0)
    encoding: str | None = None
