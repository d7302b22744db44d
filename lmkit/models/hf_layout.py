"""How Hugging Face's GPT-2 and GPT-NeoX lay out the weights lmkit's GPT holds, in one place for
the import (:mod:`lmkit.models.hf_import`) and the export (:mod:`lmkit.export.hf`), which must
stay exact inverses of each other.

* GPT-2 (``GPT2LMHeadModel``): ``Conv1D`` stores a weight ``(in, out)``, ``nn.Linear``
  ``(out, in)``: every one of :data:`CONV1D_WEIGHTS` is transposed, whatever its shape (a square
  ``c_proj`` copied untransposed corrupts every attention layer silently).
* GPT-NeoX (``GPTNeoXForCausalLM``): ``query_key_value`` holds Q, K, V interleaved per head,
  rows ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``; lmkit's fused ``c_attn`` stacks them,
  ``[q | k | v]`` with the heads contiguous in each (``transformers``'
  ``modeling_gpt_neox.py``: ``qkv.view(..., n_head, 3 * head_dim)`` then ``chunk(3)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing this module loads no torch
    import torch

#: The four GPT-2 ``Conv1D`` weights (per block), stored ``(in, out)``: always transposed.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

__all__ = ["CONV1D_WEIGHTS", "per_head_qkv", "stacked_qkv"]


def stacked_qkv(tensor: torch.Tensor, n_head: int) -> torch.Tensor:
    """NeoX rows ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]`` -> lmkit's ``[q | k | v]``.

    ``tensor``: a weight ``(3·n_embd, n_embd)`` or bias ``(3·n_embd,)``; same shape returned."""
    rest = tensor.shape[1:]
    head_dim = tensor.shape[0] // (3 * n_head)
    return tensor.reshape(n_head, 3, head_dim, *rest).transpose(0, 1).reshape(tensor.shape).contiguous()


def per_head_qkv(tensor: torch.Tensor, n_head: int) -> torch.Tensor:
    """lmkit's rows ``[q | k | v]`` -> NeoX ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]`` (the inverse of
    :func:`stacked_qkv`)."""
    rest = tensor.shape[1:]
    head_dim = tensor.shape[0] // (3 * n_head)
    return tensor.reshape(3, n_head, head_dim, *rest).transpose(0, 1).reshape(tensor.shape).contiguous()
