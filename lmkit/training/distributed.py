"""Data-parallel training across processes: torchrun's environment, the process group, agreement.

Under ``torchrun`` (or ``python -m torch.distributed.run``) every worker gets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; with ``WORLD_SIZE > 1``
the trainer joins the process group (NCCL on CUDA, one device per local rank; gloo on the
CPU) and trains with :class:`torch.nn.parallel.DistributedDataParallel`
(``training.parallelism: ddp``, the default) or FSDP2 ``fully_shard``
(``training.parallelism: fsdp``; :mod:`lmkit.training.parallel` holds what differs). Under a
launcher with ``WORLD_SIZE=1`` (``--nproc-per-node 1``) the same happens on one process when
``training.parallelism`` is set explicitly: the DDP/FSDP code path (NCCL, ``fully_shard``,
DCP checkpoints) on one GPU, as torchtitan runs FSDP with a data-parallel degree of 1. With
``WORLD_SIZE`` unset, or 1 without an explicit parallelism, nothing here runs: :class:`Distributed`
is then a stand-in whose methods do nothing.

What the ranks agree on, and how (none of it adds a host-device sync per step):

* the micro-batches: step ``s`` covers the global micro-batch indices
  ``[m, m + A*W)`` (``A = grad_accum_steps`` per rank, ``W`` ranks); rank ``r`` takes
  ``m + i*W + r`` for ``i < A``, so the global batch and the data order do not depend on
  ``W`` (a 2-rank run at accumulation 1 takes the steps of a 1-rank run at accumulation 2);
* the loss weighting: the step's target count is summed across ranks (a CPU all-reduce of
  one integer, over gloo) and each rank scales its micro-batch losses by ``W * n_i / N``,
  so DDP's equal average over ranks gives the global token-weighted mean gradient;
* the non-finite verdict: the gradient all-reduce spreads a non-finite gradient to every
  rank and the reported loss is all-reduced, so every rank's guard sees the same values;
* the stop request (SIGINT/SIGTERM on any rank): an asynchronous all-reduce (MAX) of the
  signal number over gloo, started after step ``k`` and read after step ``k + 1``
  (:class:`StopVote`), so every rank stops after the same step, with one checkpoint;
* evaluation runs on rank 0 (under FSDP on every rank in step: a forward is collective)
  and rank 0's result is broadcast (the best-checkpoint decision is the same everywhere).

Rank 0 alone writes the run folder; DDP checkpoints are one file, written by rank 0 with every
rank's RNG states gathered into it (``rng_ranks``), so ``eval``/``export``/``compare`` read
them as any other; FSDP checkpoints are DCP folders in which every rank writes its shards. Source: PyTorch's DDP notes (``no_sync``, gradient averaging) and
``torch.distributed.run``'s environment contract.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch

from lmkit.errors import ConfigError, Interrupted, LmkitError

T = TypeVar("T")


class RankFailed(LmkitError):
    """Rank 0 failed during a step all ranks wait on (set-up): the other ranks stop with its code."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: not an integer (set by torchrun)") from None


class Distributed:
    """This process's place in a data-parallel job (``world_size == 1``: a single process).

    Attributes:
        world_size / rank / local_rank: from ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``.
        enabled: ``world_size > 1``, or ``one_process`` (a launcher's single worker asked for
            DDP or FSDP explicitly).
    """

    def __init__(self, world_size: int = 1, rank: int = 0, local_rank: int = 0, *, one_process: bool = False):
        self.world_size, self.rank, self.local_rank = world_size, rank, local_rank
        self.enabled = world_size > 1 or one_process
        self.cpu_group: Any = None  # a gloo group for host-side values (the default one under gloo)
        self.started = False

    @classmethod
    def from_env(cls, parallelism: str | None = None) -> Distributed:
        """Read torchrun's variables. ``parallelism``: ``training.parallelism``; set (``ddp`` or
        ``fsdp``) under a launcher with ``WORLD_SIZE=1``, the process joins a process group of one.

        Raises:
            ConfigError: a variable is not an integer, or ``RANK`` is outside ``[0, WORLD_SIZE)``.
        """
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local = _env_int("LOCAL_RANK", rank)
        if world > 1 and not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}")
        launched = os.environ.get("WORLD_SIZE") is not None and os.environ.get("MASTER_ADDR") is not None
        return cls(world, rank, local, one_process=world == 1 and launched and parallelism in ("ddp", "fsdp"))

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run folder (rank 0)."""
        return self.rank == 0

    def check(self, parallelism: str | None, device_type: str, *, optimizer: str = "adamw",
              precision: str = "fp32") -> None:
        """Refuse what data parallelism does not support yet (one line, exit 2): another device
        than CUDA or the CPU; under FSDP the Muon optimizer (its orthogonalised update needs each
        whole matrix, FSDP holds shards) and fp16 with its GradScaler (sharded gradients are
        not unscaled by it); FSDP supports AdamW in fp32 and bf16."""
        if not self.enabled:
            return
        if parallelism == "fsdp" and optimizer != "adamw":
            raise ConfigError(f"training.optimizer: {optimizer} is not yet supported with training.parallelism: "
                              "fsdp (AdamW is); use ddp or --set training.optimizer=adamw")
        if parallelism == "fsdp" and precision == "fp16":
            raise ConfigError("training.precision: fp16 (GradScaler) is not yet supported with training.parallelism: "
                              "fsdp; use bf16 or fp32, or ddp")
        if device_type not in ("cuda", "cpu"):
            raise ConfigError(f"training on {self.world_size} processes runs on CUDA (NCCL) or the CPU (gloo), "
                              f"not {device_type}; pass --device cpu or cuda")

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` on CUDA, else ``device`` unchanged."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def start(self, device: torch.device) -> None:
        """Join the process group from the environment (NCCL on CUDA, gloo on the CPU)."""
        if not self.enabled or self.started:
            return
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=30))
            self.cpu_group = dist.new_group(backend="gloo")
        else:
            dist.init_process_group("gloo", timeout=timedelta(minutes=30))
            self.cpu_group = None  # the default group is gloo
        self.started = True

    def finish(self, barrier: bool) -> None:
        """Leave the process group (after a barrier when every rank is known to get there)."""
        if not self.started:
            return
        import torch.distributed as dist

        if barrier:
            dist.barrier(group=self.cpu_group)
        dist.destroy_process_group()
        self.started = False

    # -- collectives (no-ops on one process) -------------------------------------------------

    def barrier(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.barrier(group=self.cpu_group)

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (pickled; small values only)."""
        if not self.started:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
        if not self.started:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def sum_int(self, value: int) -> int:
        """``value`` summed over the ranks (a CPU all-reduce over gloo: no device sync)."""
        if not self.started:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, group=self.cpu_group)
        return int(tensor[0])

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) a tensor on this rank's device, in place (NCCL: queued, no host sync)."""
        if self.started:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def node_values(self, value: T) -> list[T]:
        """Every rank's ``value`` on this node (same host and torchrun ``GROUP_RANK``), in rank
        order (a collective: every rank calls it)."""
        import socket

        node = (socket.gethostname(), os.environ.get("GROUP_RANK", ""))
        return [v for n, v in self.all_gather_object((node, value)) if n == node]

    def rank0_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0, then (behind a barrier) on the others -- data preparation:
        rank 0 builds the tokenizer and shards, the others read the cache. A failure on rank
        0 stops the others too, with its exit code and message (never a hang)."""
        if not self.started:
            return fn()
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:
                code = exc.exit_code if isinstance(exc, LmkitError) else 1
                self.broadcast_object((code, " ".join(str(exc).split()) or type(exc).__name__))
                raise
            self.broadcast_object(None)
            return result
        failure = self.broadcast_object(None)
        if failure is not None:
            code, message = failure
            if code in (130, 143):
                raise Interrupted(f"rank 0: {message}", exit_code=code)
            error = RankFailed(f"rank 0 failed: {message}")
            error.exit_code = code
            raise error
        return fn()


class StopVote:
    """The stop request agreed across ranks, read one step late (no per-step sync).

    Each step every rank calls :meth:`exchange` with its own signal number (0: none); the
    call returns the MAX over ranks of the values passed *at the previous step* and starts
    the all-reduce of this one asynchronously (gloo, on the host). Every rank therefore sees
    the same answer after the same step.
    """

    def __init__(self, dist: Distributed):
        self.dist = dist
        self._work: Any = None
        self._value: torch.Tensor | None = None

    def exchange(self, signum: int) -> int:
        """The agreed signal number of the previous step (0: go on); starts this step's vote."""
        import torch.distributed as dist

        agreed = self.wait()
        self._value = torch.tensor([signum], dtype=torch.int64)
        self._work = dist.all_reduce(self._value, op=dist.ReduceOp.MAX, group=self.dist.cpu_group, async_op=True)
        return agreed

    def wait(self) -> int:
        """Finish the pending vote (if any) and return its result."""
        if self._work is None:
            return 0
        self._work.wait()
        self._work = None
        return int(self._value[0])


def exit_on_late_sigterm(exit_code: int) -> None:
    """After a stop every rank exits with ``exit_code``; torchrun SIGTERMs the workers still
    running once the first exits non-zero. Make such a late SIGTERM end this process with the
    same code instead of -15 (its checkpoint is written; nothing is left to do)."""

    def handler(signum: int, frame: Any) -> None:  # pragma: no cover - timing dependent
        sys.stderr.flush()
        os._exit(exit_code)

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


__all__ = ["Distributed", "RankFailed", "StopVote", "exit_on_late_sigterm"]
