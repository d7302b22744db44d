"""How the model is trained across processes: one strategy object per mode.

The trainer asks its :class:`Strategy` for everything that depends on the parallelism, so
the loop itself is the same on one process, under DDP and under FSDP2:

========================  ====================  ============================  ==============================
                          :class:`Single`       :class:`DDP`                  :class:`FSDP`
========================  ====================  ============================  ==============================
``shard(model)``          nothing               nothing                       ``fully_shard`` every block,
                                                                              then the root
``wrap(model)``           the model             ``DistributedDataParallel``   the (sharded) model
                          (compiled if asked)   (compiled if asked)           (compiled if asked)
micro-batch context       none                  ``no_sync()`` but the last    ``set_requires_gradient_sync``
                                                                              off but the last
loss of micro-batch i     ``l_i * n_i / N``     ``l_i * W * n_i / N``         ``l_i * W * n_i / N``
checkpoint                one file (``.pt``)    one file, rank 0, every       a DCP folder (``.dcp``), every
                                                rank's RNG                    rank its shards
========================  ====================  ============================  ==============================

``N`` is the step's *global* target count and ``W`` the number of ranks. DDP averages the
gradients over the ranks (all-reduce / W) and so does FSDP2's reduce-scatter (its default
``gradient_divide_factor`` is W), so the factor W gives the global token-weighted mean
gradient in both: sum over every rank's micro-batches of ``n_i / N * grad l_i``.

The optimizer is built after :meth:`Strategy.shard` (FSDP's parameters are then DTensor
shards) and gradient clipping is :func:`torch.nn.utils.clip_grad_norm_`, which computes the
global norm of DTensor gradients too. Sources: PyTorch's DDP notes (``no_sync``), the FSDP2
``fully_shard`` API and torchtitan's ``apply_fsdp`` (per block, then the root; a tied
embedding and head stay in the root's group).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from lmkit.events import EvalResult
from lmkit.models.base import transformer_blocks
from lmkit.training.checkpoint import link_checkpoint, save_checkpoint
from lmkit.training.evaluator import Evaluator
from lmkit.training.rng import rng_state, seed_everything, set_rng_state
from lmkit.training.state import checkpoint_state, restore_state

if TYPE_CHECKING:  # pragma: no cover
    from lmkit.training.distributed import Distributed
    from lmkit.training.loop import Trainer

#: Checkpoint entries a sharded (DCP) save writes as tensor shards; everything else is ``extra``.
SHARDED_KEYS = ("model", "optimizer")


class Strategy:
    """The single-process behaviour; the data-parallel strategies override parts of it.

    Attributes:
        name: ``None`` (one process), ``"ddp"`` or ``"fsdp"`` (``RunStarted.parallelism``).
        suffix: the checkpoint's suffix: ``.pt`` (one file) or ``.dcp`` (a folder).
        collective: every rank must run every micro-batch's forward and backward (the
            gradient reduction is a collective), even one without targets.
    """

    name: str | None = None
    suffix = ".pt"
    collective = False

    def __init__(self, dist: Distributed, device: torch.device):
        self.dist = dist
        self.device = device
        self.module: nn.Module | None = None  # the wrapped module (DDP) or the model

    # -- building -----------------------------------------------------------------------

    def shard(self, model: nn.Module, precision: str) -> None:
        """Called after the model is built and on its device, before the optimizer."""

    def wrap(self, trainer: Trainer, resume_state: dict[str, Any] | None, compile: bool) -> nn.Module:
        """The module the steps call (``torch.compile`` of it with ``compile``); also gives
        each rank its RNG stream. Called after the restore."""
        self.module = trainer.model
        return torch.compile(trainer.model) if compile else trainer.model

    def evaluator(self) -> Evaluator:
        """The evaluation hook (rank 0 evaluates; FSDP: every rank, in step)."""
        return Evaluator()

    def describe(self, batch_size: int, accum: int) -> str | None:
        """The header line naming the parallelism and the global batch (``None``: nothing)."""
        return None

    # -- one step -------------------------------------------------------------------------

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """The context of a micro-batch: gradients are reduced only on the ``last`` one."""
        return contextlib.nullcontext()

    def micro_step(self, trainer: Trainer, x_np: np.ndarray, y_np: np.ndarray, n: int, total: int,
                   n_micro: int, loss_sum: torch.Tensor, last: bool) -> None:
        """Forward and backward of one micro-batch of ``n`` targets (of the step's global
        ``total``; ``n_micro`` micro-batches per rank), adding its share of the step's mean loss to
        ``loss_sum``. One process: a micro-batch without targets is skipped (its weight is 0)."""
        if n == 0 and total > 0:
            return
        weight = n / total if total else 1.0 / n_micro
        x, y = trainer._to_device(x_np), trainer._to_device(y_np)  # noqa: SLF001
        with trainer.plan.autocast():
            _, loss = trainer.train_model(x, y)
        trainer.scaler.scale(loss * weight).backward()
        loss_sum += loss.detach().float() * weight

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor:
        """Clip the total gradient norm to ``max_norm`` (``None``/0: no clipping); return the
        norm before clipping (a 0-d tensor on this rank's device)."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)

    # -- checkpoints ----------------------------------------------------------------------

    def save(self, trainer: Trainer, paths: list[Path]) -> bool:
        """Write the checkpoint to ``paths[0]`` and link it under the others; ``True`` on the
        rank that reports and prunes (every rank must call it: the save may be collective)."""
        if self.suffix == ".dcp":  # an FSDP run continued on one process keeps its format
            return _save_dcp(self, trainer, paths)
        save_checkpoint(checkpoint_state(trainer), paths[0])
        for path in paths[1:]:
            link_checkpoint(paths[0], path)
        return True

    def restore(self, trainer: Trainer, state: dict[str, Any]) -> None:
        """Load a checkpoint's state (``restore_state``); a ``.dcp`` folder's shards are read
        with :func:`lmkit.training.sharded.load_sharded`, resharded to this process."""
        if Path(str(trainer.resume_path)).suffix == ".dcp":
            state = self._load_dcp(trainer, state)
        restore_state(trainer, state)

    def _load_dcp(self, trainer: Trainer, state: dict[str, Any]) -> dict[str, Any]:
        """The model and optimizer of a DCP folder loaded in place (resharded to this world
        size), returned with the folder's ``extra`` as a state ``restore_state`` takes."""
        from lmkit.training.sharded import load_sharded

        extra = load_sharded(Path(trainer.resume_path), trainer.model, trainer.optimizer, self.dist)
        return {**state, **extra, "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()}


class DDP(Strategy):
    """:class:`torch.nn.parallel.DistributedDataParallel`; checkpoints as on one process (one
    file written by rank 0, with every rank's RNG states in ``rng_ranks``)."""

    name = "ddp"
    collective = True

    def wrap(self, trainer: Trainer, resume_state: dict[str, Any] | None, compile: bool) -> nn.Module:
        """Wrap the model (DDP broadcasts rank 0's weights) and give each rank its own RNG
        stream (dropout) or, on a resume, this rank's saved RNG states."""
        from torch.nn.parallel import DistributedDataParallel

        cuda = self.device.type == "cuda"
        self.module = DistributedDataParallel(trainer.model, device_ids=[self.device.index] if cuda else None)
        self.rank_rng(trainer, resume_state)
        return torch.compile(self.module) if compile else self.module

    def rank_rng(self, trainer: Trainer, resume_state: dict[str, Any] | None) -> None:
        """Seed ``seed + rank`` on a new run; on a resume set this rank's saved states (a rank the
        checkpoint did not have -- a resume on more processes -- gets ``seed + rank + step``)."""
        seed, rank = trainer.config.training.seed, self.dist.rank
        if resume_state is None:
            seed_everything(seed + rank)
            return
        ranks = resume_state.get("rng_ranks") or []
        if rank < len(ranks):
            trainer.rng_notes = set_rng_state(ranks[rank])
        elif rank > 0:
            seed_everything(seed + rank + 1_000_003 * trainer.step)

    def describe(self, batch_size: int, accum: int) -> str | None:
        world = self.dist.world_size
        backend = "NCCL" if self.device.type == "cuda" else "gloo"
        procs, ranks = ("1 process", "1 rank") if world == 1 else (f"{world} processes", f"{world} ranks")
        return (f"data parallel: {procs} ({self.name.upper()}, {backend}); global batch "
                f"{batch_size * accum * world} sequences = {ranks} x {batch_size} x {accum} accumulation steps")

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.module.no_sync()

    def micro_step(self, trainer: Trainer, x_np: np.ndarray, y_np: np.ndarray, n: int, total: int,
                   n_micro: int, loss_sum: torch.Tensor, last: bool) -> None:
        """As on one process, with the loss scaled by ``W * n / N`` (the reduction averages over
        the W ranks) and the gradients reduced on the ``last`` micro-batch only. A micro-batch
        without targets still runs forward and backward (every rank joins the reduction), with
        a zero loss."""
        world = self.dist.world_size
        weight = n / total if total else 1.0 / (n_micro * world)
        x, y = trainer._to_device(x_np), trainer._to_device(y_np)  # noqa: SLF001
        with self.sync(last):
            with trainer.plan.autocast():
                if n > 0:
                    _, loss = trainer.train_model(x, y)
                    term = loss * (weight * world)
                else:
                    logits, _ = trainer.train_model(x)
                    loss = term = logits.float().sum() * 0.0
            trainer.scaler.scale(term).backward()
        if n > 0:
            loss_sum += loss.detach().float() * weight

    def save(self, trainer: Trainer, paths: list[Path]) -> bool:
        """One file, by rank 0, with every rank's RNG states; the others wait for it."""
        rngs = self.dist.all_gather_object(rng_state())
        if self.dist.is_main:
            state = checkpoint_state(trainer)
            state["rng_ranks"] = rngs
            state["parallelism"] = self.name
            save_checkpoint(state, paths[0])
            for path in paths[1:]:
                link_checkpoint(paths[0], path)
        self.dist.barrier()
        return self.dist.is_main


class FSDP(DDP):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer
    state sharded over the ranks; checkpoints are Distributed Checkpoint folders
    (:mod:`lmkit.training.sharded`) in which every rank writes its shards."""

    name = "fsdp"
    suffix = ".dcp"

    def shard(self, model: nn.Module, precision: str) -> None:
        """``fully_shard`` each transformer block, then the root (which keeps the embeddings,
        the final norm and the head: a tied embedding and head are one parameter of the root's
        group). bf16: the blocks compute in bf16 with fp32 master weights and fp32 gradient
        reduction (``MixedPrecisionPolicy``)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.dist.world_size,))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if precision == "bf16" else MixedPrecisionPolicy())
        blocks = list(transformer_blocks(model))
        for i, block in enumerate(blocks):
            # the last block's parameters are needed again at once by backward: keep them
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
        fully_shard(model, mesh=mesh, mp_policy=policy)

    def wrap(self, trainer: Trainer, resume_state: dict[str, Any] | None, compile: bool) -> nn.Module:
        self.module = trainer.model
        self.rank_rng(trainer, resume_state)
        return torch.compile(trainer.model) if compile else trainer.model

    def evaluator(self) -> Evaluator:
        return EveryRankEvaluator()

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        return _gradient_sync(self.module, last)

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor:
        """The global norm of the sharded gradients (a replicated DTensor, returned as a tensor)."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)
        return norm.to_local() if hasattr(norm, "to_local") else norm

    def save(self, trainer: Trainer, paths: list[Path]) -> bool:
        return _save_dcp(self, trainer, paths)

    def restore(self, trainer: Trainer, state: dict[str, Any]) -> None:
        """Load the DCP folder's shards, resharded to this world size, then the rest of the state.

        Raises:
            CheckpointError: the checkpoint is a single file (FSDP resumes DCP folders only).
        """
        if Path(str(trainer.resume_path)).suffix != ".dcp":
            from lmkit.errors import CheckpointError

            raise CheckpointError(f"{trainer.resume_path}: a single-file checkpoint; training.parallelism: fsdp "
                                  "resumes sharded (.dcp) folders -- resume this run on one process")
        restore_state(trainer, self._load_dcp(trainer, state))


def _save_dcp(strategy: Strategy, trainer: Trainer, paths: list[Path]) -> bool:
    """A DCP folder at ``paths[0]`` (every rank writes its shards; rank 0 the rest of the
    state, with every rank's RNG states and the parallelism), then linked under the other tags
    by rank 0; the others wait for it."""
    from lmkit.training.sharded import save_sharded

    dist = strategy.dist
    rngs = dist.all_gather_object(rng_state())
    extra: dict[str, Any] = {}
    if dist.is_main:
        extra = {k: v for k, v in checkpoint_state(trainer).items() if k not in SHARDED_KEYS}
        extra["rng_ranks"] = rngs
        extra["parallelism"] = "fsdp"
    save_sharded(trainer.model, trainer.optimizer, extra, paths[0], dist)
    if dist.is_main:
        for path in paths[1:]:
            link_checkpoint(paths[0], path)
    dist.barrier()
    return dist.is_main


class _EveryRankMain:
    """A view of the trainer's :class:`~lmkit.training.distributed.Distributed` in which every
    rank is the main one, for the evaluation's computation only: its broadcast of rank 0's numbers
    (the evaluator's last use of ``trainer.dist``) puts the real one back, so the result's event and
    the ``on_eval`` hooks see the real ranks."""

    is_main = True

    def __init__(self, trainer: Trainer, dist: Distributed):
        self._trainer, self._dist = trainer, dist

    def broadcast_object(self, obj: Any) -> Any:
        self._trainer.dist = self._dist
        return self._dist.broadcast_object(obj)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dist, name)


class EveryRankEvaluator(Evaluator):
    """FSDP: a forward is collective (each block's parameters are all-gathered), so every rank
    runs the same evaluation in step; rank 0's numbers are broadcast as under DDP."""

    def evaluate(self, trainer: Trainer) -> EvalResult:
        dist = trainer.dist
        trainer.dist = _EveryRankMain(trainer, dist)
        try:
            return super().evaluate(trainer)
        finally:
            trainer.dist = dist


@contextlib.contextmanager
def _gradient_sync(module: nn.Module, last: bool) -> Iterator[None]:
    """FSDP2: reduce-scatter the gradients on the ``last`` micro-batch only (the others
    accumulate unsharded gradients locally, like DDP's ``no_sync``)."""
    module.set_requires_gradient_sync(last)
    yield


def make_strategy(dist: Distributed, parallelism: str | None, device: torch.device) -> Strategy:
    """The strategy of this process: one process, or DDP / FSDP under torchrun (``None``: DDP)."""
    if not dist.enabled:  # an FSDP run continued on one process keeps its DCP folders
        strategy = Strategy(dist, device)
        strategy.suffix = ".dcp" if parallelism == "fsdp" else ".pt"
        return strategy
    return FSDP(dist, device) if parallelism == "fsdp" else DDP(dist, device)


__all__ = ["DDP", "FSDP", "EveryRankEvaluator", "SHARDED_KEYS", "Strategy", "make_strategy", "transformer_blocks"]
