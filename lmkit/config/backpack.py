"""Config classes of the Backpack families (SEEDS_SPEC section 4; Hewitt et al., ACL 2023,
arXiv 2305.16765): ``backpack`` (the paper's model) and ``backpack-legacy`` (the d40efde
variant of kavyavenk/multilingual-backpacks, for parity). The contextualiser's keys are the
GPT family's (``n_layer``, ``n_head``, ``n_embd``, ``d_ff``, ``block_size``, ``pos_encoding``,
``bias`` ...)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmkit.config import GPTConfig, register_model_family


class BackpackConfig(GPTConfig):
    """The paper's Backpack: ``n_senses`` sense vectors per word from a sense network over the
    (tied) word embedding, mixed by causal contextualisation weights from a GPT contextualiser
    (:class:`lmkit.models.backpack.Backpack`).

    Attributes:
        n_senses: sense vectors per vocabulary item (k); ``n_embd`` must be a multiple of it
            (each sense's weight head has ``n_embd / n_senses`` dimensions).
        sense_mlp_ratio: hidden width of the sense network's two MLPs, as a multiple of
            ``n_embd`` (the reference code's ``sense_intermediate_scale``, 4).
        tie_embeddings: always true: the output embedding is the input embedding E (the
            paper's log-linear form logits = E·o).

    The GPT keys shape the contextualiser; ``norm``/``norm_affine`` and ``activation`` also the
    sense network's norms and MLPs; ``qk_norm``, ``qkv``, ``embed_norm`` and ``init`` work as in
    the GPT family. ``logit_softcap`` is refused (it would make the logits non-linear in the senses).
    """

    type: Literal["backpack"] = "backpack"
    n_senses: int = Field(16, gt=0)
    sense_mlp_ratio: int = Field(4, gt=0)

    @model_validator(mode="after")
    def _check_backpack(self) -> BackpackConfig:
        if not self.tie_embeddings:
            raise ValueError("a backpack's output embedding is its input embedding: tie_embeddings must be true")
        if self.logit_softcap is not None:
            raise ValueError("a backpack's logits are E·o, log-linear in the senses: logit_softcap is not supported")
        if self.n_embd % self.n_senses != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_senses ({self.n_senses})")
        return self

    @property
    def sense_head_dim(self) -> int:
        """Query/key width of each sense's contextualisation head, ``n_embd / n_senses``."""
        return self.n_embd // self.n_senses


class BackpackLegacyConfig(GPTConfig):
    """The d40efde model (:class:`lmkit.models.backpack.BackpackLegacy`): an
    ``Embedding(V, n_embd * n_senses)`` sense table, position-only softmax sense weights, the
    mixture as the input of an ordinary Transformer, untied head. Learned positions only (the
    sense weights are computed from them); the GPT block options (``norm``, ``qk_norm``, ``qkv``,
    ``activation``) apply to its blocks, ``embed_norm``, ``logit_softcap`` and ``init: nanochat``
    are refused (not part of the original)."""

    type: Literal["backpack-legacy"] = "backpack-legacy"
    n_senses: int = Field(16, gt=0)
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _check_legacy(self) -> BackpackLegacyConfig:
        if self.tie_embeddings:
            raise ValueError("backpack-legacy has an untied head (its token table is V x n_embd*n_senses): "
                             "tie_embeddings must be false")
        if self.pos_encoding != "learned":
            raise ValueError("backpack-legacy computes its sense weights from learned positions: "
                             "pos_encoding must be learned")
        extras = [key for key, off in (("embed_norm", False), ("logit_softcap", None), ("init", "gpt2"))
                  if getattr(self, key) != off]
        if extras:
            raise ValueError(f"backpack-legacy reproduces the original model: {', '.join(extras)} is not supported")
        return self


register_model_family("backpack", "lmkit.models.backpack:Backpack", BackpackConfig)
register_model_family("backpack-legacy", "lmkit.models.backpack_legacy:BackpackLegacy", BackpackLegacyConfig)

__all__ = ["BackpackConfig", "BackpackLegacyConfig"]
