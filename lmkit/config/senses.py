"""The ``senses:`` section: reading a Backpack's sense vectors during training (SEEDS_SPEC
section 4.2, "lmkit spec for top activating words"; Hewitt et al., ACL 2023, arXiv 2305.16765,
section 4's sense tables).

Every ``log_interval`` optimizer steps the hook (:mod:`lmkit.training.senses`) writes two kinds
of records to ``runs/NAME/senses.jsonl`` and the seed's ``runs/NAME/training_log.json``:

* **projection** -- for each sense ℓ of each query word w (``words``, and the ``n_frequent``
  most frequent word tokens of the validation split), the ``top_k`` and bottom ``top_k``
  vocabulary items by ``E·C(w)_ℓ``;
* **activation** -- over the first ``val_tokens`` tokens of the validation split, for each
  sense ℓ, the ``top_k`` source tokens x_j by the weight ``Σ_i α_ℓ[i, j]`` they receive
  (``activation: mean`` over a token's occurrences, or ``max``), among tokens seen at least
  ``min_count`` times.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmkit.config import _Strict, register_feature


class SensesConfig(_Strict):
    """The senses log of a ``backpack`` run. Off while ``log_interval`` is ``None``.

    Attributes:
        log_interval: log every this many optimizer steps (and at the last step); ``None``
            = off. Set on a model without senses, the run stops at start (ConfigError).
        words: query words, as they appear in running text (``Parliament`` is looked up as
            `` Parliament`` with a byte-level BPE); a word of several tokens is logged per token.
        n_frequent: also log the senses of the validation split's most frequent word tokens
            (tokens with a letter or digit; 0 = none).
        top_k: vocabulary items per sense (top and bottom) and source tokens per sense.
        val_tokens: tokens of the validation split (from its start) for the activation pass.
        activation: how a token type's per-occurrence weights ``Σ_i α_ℓ[i, j]`` combine:
            ``mean`` or ``max``.
        min_count: occurrences a token needs in those ``val_tokens`` to be ranked.
    """

    log_interval: int | None = Field(None, gt=0)
    words: list[str] = Field(default_factory=list)
    n_frequent: int = Field(10, ge=0)
    top_k: int = Field(10, gt=0)
    val_tokens: int = Field(4096, gt=1)
    activation: Literal["mean", "max"] = "mean"
    min_count: int = Field(3, gt=0)


register_feature("senses", SensesConfig, "lmkit.training.senses:build_hook")

__all__ = ["SensesConfig"]
