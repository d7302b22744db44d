"""The language-model loss: mean cross-entropy over the targets that are not ``IGNORE_INDEX``.

One function, :func:`cross_entropy`, for every family. It returns the same value as
``F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100)``; on the CPU,
when a backward will follow, it takes a faster route with the same result to ~1e-7
(:class:`_CrossEntropyGradInForward`): the gradient with respect to the logits,
``softmax(z) - onehot(y)`` (the standard derivative of ``-log softmax(z)_y``; e.g. Goodfellow
et al., *Deep Learning*, section 6.2.2.3), is computed in the forward, a block of rows at a
time while the block is in cache, and stored instead of ``log_softmax``'s output (the same
``4·N·V`` bytes). Backward is then one in-place scaling of that buffer. ATen's route reads
and writes the ``N×V`` logits seven times (max, sum of exp, the log-probs; in backward a
zero-filled ``N×V`` gradient, the scatter, and ``log_softmax_backward``'s read of both);
``python benchmarks/cross_entropy_speed.py`` measured about half the time of ATen's route
(forward + backward, N=2048, V=8192, fp32, 1 thread), ~5% of a training step at
``benchmarks/train_throughput.py``'s shape.
This is the idea of "fused" cross-entropy kernels (e.g. Liger Kernel, Hsu et al. 2024,
arXiv 2410.10989, section 3.1), written with ATen ops.

CUDA, MPS, autocast's 16-bit logits, ``torch.compile`` (Inductor fuses the loss itself) and
no-grad calls keep ``F.cross_entropy``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmkit.data.batching import IGNORE_INDEX

__all__ = ["cross_entropy"]

#: Elements per thread in a block of rows of the CPU route (4 MiB of fp32: a core's share of cache).
_BLOCK_ELEMENTS = 1 << 20


class _CrossEntropyGradInForward(torch.autograd.Function):
    """Mean cross-entropy of fp32 ``logits`` ``(N, V)`` against ``targets`` ``(N,)`` whose
    forward also computes ``d loss / d logits`` (see the module docstring). Backward runs
    once: it scales the saved buffer in place, so a second backward through the same graph
    (``retain_graph=True``) raises torch's in-place-modification error; no double backward. With every target ignored the loss is NaN (0/0) and the gradient zero, as
    ``F.cross_entropy``'s."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n_rows, vocab = logits.shape
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, 0).unsqueeze(1)
        weight = valid.to(logits.dtype).unsqueeze(1)
        count = int(valid.sum())  # a CPU tensor: no device sync
        grad = torch.empty_like(logits)
        total = logits.new_zeros(())
        rows = max(1, _BLOCK_ELEMENTS * torch.get_num_threads() // max(vocab, 1))  # ~4 MiB per thread
        for start in range(0, n_rows, rows):
            z, g = logits[start:start + rows], grad[start:start + rows]
            t, w = safe[start:start + rows], weight[start:start + rows]
            peak = z.amax(dim=1, keepdim=True)
            torch.sub(z, peak, out=g).exp_()
            denom = g.sum(dim=1, keepdim=True)
            g.div_(denom)  # softmax(z)
            total += ((peak + denom.log() - z.gather(1, t)) * w).sum()  # sum of -log softmax(z)_y
            g.scatter_add_(1, t, -w)  # softmax(z) - onehot(y) on the counted rows
            g.mul_(w)  # ignored rows contribute nothing
        ctx.save_for_backward(grad)
        ctx.count = count
        return total / count if count else total * math.nan

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        # the buffer is this node's alone and backward runs once: scale it in place
        return grad.mul_(grad_output / max(ctx.count, 1)), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats per counted target.

    Args:
        logits: ``(B, T, V)`` (or ``(N, V)``), any float dtype.
        targets: ``(B, T)`` (or ``(N,)``) int64 class ids; ``IGNORE_INDEX`` (-100) is not counted.

    Returns:
        A 0-dim tensor: ``sum(-log softmax(logits)[target]) / count`` over the counted targets
        (NaN when none is counted, like ``F.cross_entropy``).

    A separate function so that the caller holds no reference to the logits: only the
    ``(N, V)`` buffer backward needs survives the call.
    """
    flat, flat_targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    fast = (flat.device.type == "cpu" and flat.dtype == torch.float32 and flat.requires_grad
            and torch.is_grad_enabled() and not torch.compiler.is_compiling())
    if fast:
        return _CrossEntropyGradInForward.apply(flat, flat_targets)
    return F.cross_entropy(flat, flat_targets, ignore_index=IGNORE_INDEX)
