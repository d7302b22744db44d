"""The optimizers: AdamW with decay / no-decay groups, or nanochat's Muon + AdamW.

``training.optimizer: adamw`` -- weight decay applies to every parameter with two or more
dimensions (matmul weights and embeddings); biases and LayerNorm gains are not decayed (the
GPT-2 / nanoGPT rule; Loshchilov & Hutter 2019 for decoupled weight decay). A tied head is one
parameter, counted once.

``training.optimizer: muon`` -- nanochat's ``base_train.py`` / ``GPT.setup_optimizers``
(karpathy/nanochat, November 2025): Muon (Jordan et al. 2024, "Muon: an optimizer for hidden
layers"; ``torch.optim.Muon``) for the 2-D matrices of the blocks, AdamW for the embedding and
the output head with their own LRs scaled by ``(n_embd / 768) ** -0.5``, and the Muon momentum
warmed from 0.85 to 0.95 over the first 300 steps (``get_muon_momentum``). Both live in one
:class:`MuonAdamW`, so the trainer's one ``LambdaLR``, ``GradScaler``, gradient clipping and
checkpointing see one optimizer. Parameters with ``requires_grad`` false are left out, so a
rebuild after a layer was frozen, unfrozen or swapped (adaptive SVD's ``lora_A`` / ``lora_B``
are 2-D and go to Muon) follows the model.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
from torch import nn

from lmkit.config import TrainConfig

__all__ = ["MuonAdamW", "build_optimizer", "muon_momentum", "muon_param_groups", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """``[{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0}]``."""
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields a shared (tied) tensor once
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, training: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``training.optimizer`` names, over the parameters that require grad.

    ``adamw``: AdamW with ``training.lr``, ``betas``, ``eps`` and ``weight_decay``; the fused
    kernel (one launch for all parameters, and non-finite steps skipped on the device) when
    ``training.fused_optimizer`` says so, by default on CUDA and the CPU (torch's fused CPU
    kernel: ``python benchmarks/train_throughput.py`` shape, 52 tensors, one thread: about 5x
    less time in ``step()`` than the per-parameter loop torch uses otherwise on the CPU).

    ``muon``: a :class:`MuonAdamW` over :func:`muon_param_groups`: ``torch.optim.Muon`` with
    ``lr``, ``muon_weight_decay`` (torch's default would be 0.1; nanochat's is 0),
    ``muon_nesterov``, ``muon_ns_steps`` and ``adjust_lr_fn="original"`` -- Keller Jordan's
    ``lr · sqrt(max(1, rows / cols))``, which is nanochat's own Muon (``p.add_(g, alpha=-lr *
    max(1, p.size(-2) / p.size(-1)) ** 0.5)``); ``"match_rms_adamw"`` (Moonshot's ``0.2 ·
    sqrt(max(rows, cols))``) is not. AdamW over the rest with ``betas``, ``eps``,
    ``weight_decay`` (fused as above).
    """
    fused = training.fused_optimizer if training.fused_optimizer is not None else device.type in ("cuda", "cpu")
    if training.optimizer == "muon":
        muon_params, adam_groups = muon_param_groups(model, training)
        muon = None
        if muon_params:
            muon = torch.optim.Muon(muon_params, lr=training.lr, weight_decay=training.muon_weight_decay,
                                    momentum=training.muon_momentum_start, nesterov=training.muon_nesterov,
                                    ns_steps=training.muon_ns_steps, adjust_lr_fn="original")
        adamw = None
        if adam_groups:
            adamw = torch.optim.AdamW(adam_groups, betas=training.betas, eps=training.eps,
                                      weight_decay=training.weight_decay, fused=fused)
        return MuonAdamW(muon, adamw, momentum_start=training.muon_momentum_start,
                         momentum_end=training.muon_momentum, warmup_steps=training.muon_momentum_warmup_steps)
    return torch.optim.AdamW(
        param_groups(model, training.weight_decay),
        lr=training.lr,
        betas=training.betas,
        eps=training.eps,
        fused=fused,
    )


def muon_param_groups(model: nn.Module, training: TrainConfig) -> tuple[list[nn.Parameter], list[dict]]:
    """Split the trainable parameters as nanochat does: ``(muon_params, adamw_groups)``.

    * embeddings -- the weights of every ``nn.Embedding`` (token, learned positions; a tied head
      is the token embedding and stays here): AdamW at ``embedding_lr · s``;
    * the output head (``model.output_head()``, untied): AdamW at ``head_lr · s``;
    * every other 2-D parameter (the blocks' matrices): Muon at ``lr``;
    * the rest (biases, norm gains -- nanochat's GPT has none): AdamW at ``head_lr · s``;

    with ``s = (n_embd / lr_reference_width) ** -0.5`` (1 when ``lr_reference_width`` is null or
    the model has no ``config.n_embd``). Empty AdamW groups are left out; each group carries a
    ``name`` (``embedding``, ``head``, ``other``).
    """
    embedding_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embedding_ids.add(id(module.weight))
    head_ids: set[int] = set()
    get_head = getattr(model, "output_head", None)
    if callable(get_head):
        head_ids = {id(p) for p in get_head().parameters()} - embedding_ids
    width = getattr(getattr(model, "config", None), "n_embd", None)
    scale = 1.0
    if training.lr_reference_width is not None and width:
        scale = (width / training.lr_reference_width) ** -0.5
    muon: list[nn.Parameter] = []
    embedding: list[nn.Parameter] = []
    head: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_ids:
            embedding.append(param)
        elif id(param) in head_ids:
            head.append(param)
        elif param.dim() == 2:
            muon.append(param)
        else:
            other.append(param)
    # nanochat's order: lm_head first, then the embedding (setup_optimizers' adam_groups)
    groups = [
        {"name": "head", "params": head, "lr": training.head_lr * scale},
        {"name": "embedding", "params": embedding, "lr": training.embedding_lr * scale},
        {"name": "other", "params": other, "lr": training.head_lr * scale},
    ]
    return muon, [g for g in groups if g["params"]]


def muon_momentum(step: int, *, start: float = 0.85, end: float = 0.95, warmup_steps: int = 300) -> float:
    """Muon's momentum for the optimizer step after ``step`` steps: ``(1 - f)·start + f·end`` with
    ``f = min(step / warmup_steps, 1)`` (nanochat ``base_train.py`` ``get_muon_momentum``);
    ``end`` when ``warmup_steps`` is 0."""
    frac = 1.0 if warmup_steps <= 0 else min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end


class _UnionState(MutableMapping):
    """``opt.state`` of :class:`MuonAdamW`: each parameter's state, held by the child that owns it."""

    def __init__(self, owner: MuonAdamW):
        self._owner = owner

    def _child(self, param: Any) -> torch.optim.Optimizer:
        child = self._owner._owner_of(param)  # noqa: SLF001
        if child is None:
            raise KeyError("parameter is not optimised by this optimizer")
        return child

    def __getitem__(self, param: Any) -> Any:
        return self._child(param).state[param]

    def __setitem__(self, param: Any, value: Any) -> None:
        self._child(param).state[param] = value

    def __delitem__(self, param: Any) -> None:
        del self._child(param).state[param]

    def __contains__(self, param: object) -> bool:
        return any(param in c.state for c in self._owner.children)

    def __iter__(self) -> Iterator[Any]:
        for child in self._owner.children:
            yield from child.state

    def __len__(self) -> int:
        return sum(len(c.state) for c in self._owner.children)


class MuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` and ``torch.optim.AdamW`` as one optimizer.

    ``param_groups`` is the union of the two children's group dicts (the same dict objects, Muon's
    first), so a ``LambdaLR`` built on this optimizer records every group's own initial LR and
    scales them all by one multiplier; ``GradScaler.unscale_`` / ``step``, gradient clipping and
    ``zero_grad`` see every parameter. ``state`` maps each parameter to its child's state
    (``param in opt.state``, ``opt.state[p]``, ``opt.state[p] = s``). ``defaults`` is empty (no
    fused ``found_inf`` path: the NaN guard checks on the host).

    The Muon momentum warmup lives here: ``step()`` first sets every Muon group's ``momentum`` to
    :func:`muon_momentum` of :attr:`steps_taken` (the number of ``step()`` calls so far), then steps
    both children, then counts. ``state_dict()`` holds both children's state dicts and
    ``steps_taken``, so a resumed run continues the warmup bitwise. A skipped step (``step()`` not
    called: non-finite gradients, an SVD switch) does not advance the warmup. A rebuilt optimizer
    (``Trainer.rebuild_optimizer``) starts at 0 unless the caller sets ``new.steps_taken =
    old.steps_taken``.

    Args:
        muon, adamw: the children; either may be ``None`` (no parameter of that kind), not both.
        momentum_start, momentum_end, warmup_steps: the warmup (nanochat: 0.85, 0.95, 300).

    Raises:
        ValueError: both children are ``None``.
    """

    def __init__(self, muon: torch.optim.Muon | None, adamw: torch.optim.Optimizer | None, *,
                 momentum_start: float = 0.85, momentum_end: float = 0.95, warmup_steps: int = 300):
        children = [c for c in (muon, adamw) if c is not None]
        if not children:
            raise ValueError("MuonAdamW needs at least one parameter to optimise")
        params = [p for c in children for g in c.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.muon, self.adamw = muon, adamw
        self.children = children
        self.param_groups = [g for c in children for g in c.param_groups]
        self.state = _UnionState(self)  # type: ignore[assignment]
        self.momentum_start, self.momentum_end, self.warmup_steps = momentum_start, momentum_end, warmup_steps
        self.steps_taken = 0

    @property
    def steps_taken(self) -> int:
        """``step()`` calls so far: the momentum warmup's position. Setting it (a rebuilt optimizer
        taking over its predecessor's position) also sets the Muon groups' momentum."""
        return self._steps_taken

    @steps_taken.setter
    def steps_taken(self, value: int) -> None:
        self._steps_taken = int(value)
        self._set_momentum()

    def _owner_of(self, param: Any) -> torch.optim.Optimizer | None:
        for child in self.children:
            for group in child.param_groups:
                if any(p is param for p in group["params"]):
                    return child
        return None

    def momentum(self) -> float:
        """The Muon momentum the next ``step()`` uses."""
        return muon_momentum(self.steps_taken, start=self.momentum_start, end=self.momentum_end,
                             warmup_steps=self.warmup_steps)

    def _set_momentum(self) -> None:
        if self.muon is not None:
            m = self.momentum()
            for group in self.muon.param_groups:
                group["momentum"] = m

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - see the class docstring
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._set_momentum()
        for child in self.children:
            child.step()
        self._steps_taken += 1  # the groups keep the momentum this step used until the next one
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        for child in self.children:
            child.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """A standard optimizer state dict over the union of the groups (``state`` keyed by
        parameter index, ``param_groups`` with index lists, Muon's groups first) plus
        ``steps_taken``."""
        out = super().state_dict()
        out["steps_taken"] = self.steps_taken
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` gave: each child gets its groups and their parameters'
        state (re-indexed), then the warmup position.

        Raises:
            ValueError: not a ``MuonAdamW`` state (e.g. a plain AdamW checkpoint: no
                ``steps_taken``), or groups / parameter counts that do not match.
        """
        if "steps_taken" not in state_dict:
            raise ValueError("optimizer state is not a Muon + AdamW state (the run was trained with "
                             "training.optimizer=adamw?)")
        groups, state = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(groups)} parameter groups, this optimizer "
                             f"{len(self.param_groups)}")
        first = 0
        for child in self.children:
            mine = groups[first:first + len(child.param_groups)]
            first += len(child.param_groups)
            index = {old: new for new, old in enumerate(i for g in mine for i in g["params"])}
            child.load_state_dict({
                "state": {index[i]: s for i, s in state.items() if i in index},
                "param_groups": [{**g, "params": [index[i] for i in g["params"]]} for g in mine],
            })
        # the children's load_state_dict replaced their group dicts: re-point the union at them
        self.param_groups = [g for c in self.children for g in c.param_groups]
        self.steps_taken = int(state_dict["steps_taken"])
