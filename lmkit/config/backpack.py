"""Config classes of the Backpack families (SEEDS_SPEC section 4; Hewitt et al., ACL 2023,
arXiv 2305.16765): ``backpack`` (the paper's model) and ``backpack-legacy`` (seed 002's
commit-d40efde variant, for parity). The contextualiser's keys are the GPT family's."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmkit.config import GPTConfig, register_model_family


class BackpackConfig(GPTConfig):
    """The paper's Backpack: ``n_senses`` sense vectors per word from a sense network over the
    (tied) word embedding, mixed by causal contextualisation weights from a GPT contextualiser.

    Attributes:
        n_senses: sense vectors per vocabulary item (k).
        sense_mlp_ratio: hidden width of the sense network's MLPs, as a multiple of ``n_embd``.
    """

    type: Literal["backpack"] = "backpack"
    n_senses: int = Field(16, gt=0)
    sense_mlp_ratio: int = Field(4, gt=0)


class BackpackLegacyConfig(GPTConfig):
    """Seed 002's d40efde model: an ``Embedding(V, n_embd * n_senses)`` sense table, position-only
    softmax sense weights, the mixture as the input of an ordinary Transformer, untied head."""

    type: Literal["backpack-legacy"] = "backpack-legacy"
    n_senses: int = Field(16, gt=0)
    tie_embeddings: bool = False


register_model_family("backpack", "lmkit.models.backpack:Backpack", BackpackConfig)
register_model_family("backpack-legacy", "lmkit.models.backpack:BackpackLegacy", BackpackLegacyConfig)

__all__ = ["BackpackConfig", "BackpackLegacyConfig"]
