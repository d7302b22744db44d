"""Per-GPU memory of data-parallel training at world size ``N``: DDP and FSDP2 (``lmkit doctor --nproc N``).

Arithmetic on a :class:`~lmkit.config.ModelConfig`, no torch (as :mod:`lmkit.analysis.memory`). It
re-prices the single-process walk of :func:`~lmkit.analysis.memory.estimate_memory` (the same
per-rank micro-batch ``B``: ``training.batch_size`` is per rank, so each rank's activations, logits
and temporaries are one process's) with what each rank holds of the model. ``P`` parameters, ``L``
blocks of ``P_l`` each, the root ``P_r = P - L·P_l`` (embeddings, final norm, an untied head, a
family's own parts); ``shard(p)`` is one rank's part of a tensor.

**DDP** (:class:`torch.nn.parallel.DistributedDataParallel` as lmkit builds it: defaults,
``gradient_as_bucket_view=False``): every rank holds the full replica -- weights ``4P``, fp32
``.grad`` ``4P`` (alive as in one process), AdamW state ``8P`` -- plus the reducer's gradient
buckets. With ``gradient_as_bucket_view=False`` the reducer allocates, when DDP is built, one flat
tensor per bucket for *all* parameters that need a gradient (``Reducer::initialize_buckets``:
``bucket.gradients = at::empty({offset})``), copies each ``.grad`` into it, all-reduces it and copies
it back (``mark_variable_ready_dense`` / ``finalize_bucket_dense`` in
``torch/csrc/distributed/c10d/reducer.cpp``). The 25 MiB ``bucket_cap_mb`` (1 MiB for the first
bucket, ``dist._DEFAULT_FIRST_BUCKET_BYTES``) sets how many buckets there are, not their total:
``4P`` bytes, alive for the whole run. So a DDP rank peaks at one process's peak ``+ 4P``.

**FSDP2** (``fully_shard(block, reshard_after_forward=True)`` per transformer block, then the root):
weights, gradients and AdamW state are sharded on dim 0 -- each rank keeps ``ceil(d0/N)`` rows of
every parameter (FSDP pads dim 0 to a multiple of ``N``; exact when ``param_shapes`` is given,
``ceil(P/N)`` otherwise). During the step a group's parameters are all-gathered to full fp32
tensors (no ``MixedPrecisionPolicy``: autocast casts them as in one process): the root's from the
end of forward until its post-backward (backward uses the head and the embeddings first and last),
a block's during its forward and its backward, with the next block prefetched (FSDP2's default
backward prefetch of one group, ``FSDPParamGroup._backward_prefetch``; in forward the next block's
all-gather overlaps the current one on CUDA). Gradients appear unsharded (``4·P_l`` for the block in
backward, the root's head and norm gradients until the root's reduce-scatter) and are
reduce-scattered to shards (``4·shard(P_l)``) when a group's backward ends. FSDP keeps the last
reduce-scatter's flat input (``4·N·shard(P_l)``) in flight until the next group's post-backward
(``reduce_scatter_max_input_buffers = 1``), so it is alive during the next block's backward too;
each group's post-backward (resharded, its gradients copied into a new input) is a phase of its own.
The optimizer step runs on the shards. Without accumulation, sharded gradients exist only for the
groups done; with ``grad_accum_steps > 1`` all shards persist between micro-batches (FSDP2
reduce-scatters every micro-batch). The root: given ``reshard_after_forward=True`` explicitly it
is resharded after forward and all-gathered again when backward starts (left to FSDP's default,
the root is not resharded); either way it is whole from the loss backward to its post-backward,
where the peaks fall.

Not counted: NCCL's own communication buffers (outside PyTorch's allocator, like the CUDA
context), DDP's one-off broadcast of rank 0's weights when it is built (before any activations),
a ``MixedPrecisionPolicy`` (16-bit all-gathers). The estimate is checked against the tensors a
2-process gloo run holds on the CPU (:func:`lmkit.analysis.memory_measure.measure_parallel`;
``tests/test_memory_parallel.py``): weights, gradients, optimizer state and DDP's buckets to the
byte, the peak within 0.3% (DDP) and 2% (FSDP; the least of four steps' peaks), except for a model whose root (embeddings, an
untied head) is most of it, where FSDP measures 9-12% more than estimated at the root's
reduce-scatter (one more root-matrix-sized buffer; not explained yet). Not yet checked on a GPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lmkit.analysis.memory import (
    FrameworkOverhead,
    MemoryEstimate,
    MemoryRow,
    count_params,
    estimate_memory,
    find_row,
)
from lmkit.config import ModelConfig
from lmkit.errors import ConfigError

PARALLELISMS = ("ddp", "fsdp")

#: DDP's default bucket cap (``bucket_cap_mb=None`` -> 25 MiB) and first bucket (1 MiB).
DDP_BUCKET_BYTES = 25 * 2**20
DDP_FIRST_BUCKET_BYTES = 2**20

_BLOCK = re.compile(r"block (\d+) backward$")


@dataclass
class ParallelMemoryEstimate:
    """Result of :func:`estimate_parallel_memory`: what one rank's device holds. Bytes throughout.

    Attributes:
        parallelism: ``ddp`` or ``fsdp``.
        nproc: world size ``N``.
        rows: the breakdown -- name, full size on this rank, the part alive at the peak, formula.
        peak_allocated: the rank's ``torch.cuda.max_memory_allocated()``.
        peak_phase: where in the step it falls.
        overhead: CUDA context + allocator slack (:class:`~lmkit.analysis.memory.FrameworkOverhead`).
        total: ``peak_allocated + overhead`` -- what each GPU must hold.
        single: the one-process estimate it starts from (same micro-batch).
    """

    parallelism: str
    nproc: int
    batch_size: int
    seq_len: int
    precision: str
    device: str
    n_params: int
    rows: list[MemoryRow]
    model_state: int
    peak_allocated: int
    peak_phase: str
    overhead: int
    total: int
    single: MemoryEstimate = field(repr=False)

    def row(self, name: str) -> MemoryRow:
        return find_row(self.rows, name)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows"] = [asdict(r) for r in self.rows]
        out["single_process_total"] = self.single.total
        out.pop("single")
        return out


def shard_numel(shapes: Sequence[Sequence[int]], nproc: int) -> int:
    """Elements one rank of ``nproc`` keeps of these parameters under FSDP2: ``ceil(d0/N)`` rows of
    each (``torch.distributed.fsdp``'s ``FSDPParam`` pads dim 0 to a multiple of ``N``)."""
    total = 0
    for shape in shapes:
        shape = tuple(shape) or (1,)
        rest = math.prod(shape[1:])
        total += -(-shape[0] // nproc) * rest
    return total


def ddp_bucket_count(trainable_bytes: int) -> int:
    """How many buckets DDP's reducer makes after its first iteration (a 1 MiB first bucket, then
    25 MiB ones) -- approximately: buckets close at parameter boundaries."""
    if trainable_bytes <= DDP_FIRST_BUCKET_BYTES:
        return 1
    return 1 + math.ceil((trainable_bytes - DDP_FIRST_BUCKET_BYTES) / DDP_BUCKET_BYTES)


def estimate_parallel_memory(cfg: ModelConfig, batch_size: int, *, nproc: int, parallelism: str = "ddp",
                             block_shapes: Sequence[Sequence[int]] | None = None,
                             root_shapes: Sequence[Sequence[int]] | None = None,
                             **kwargs: Any) -> ParallelMemoryEstimate:
    """Estimate one rank's device memory in a DDP or FSDP2 training step at world size ``nproc``.

    Args:
        cfg: the model (``vocab_size`` set).
        batch_size: sequences per micro-batch *per rank* (``training.batch_size``).
        nproc: world size ``N`` (>= 1).
        parallelism: ``ddp`` or ``fsdp`` (module docstring).
        block_shapes: the parameter shapes of one transformer block, and ``root_shapes`` those of
            the rest (each distinct parameter once): FSDP's dim-0 padding counted exactly. Without
            them a group's shard is ``ceil(numel/N)``, exact when every dim 0 divides by ``N``.
        kwargs: as :func:`~lmkit.analysis.memory.estimate_memory` (``seq_len``, ``precision``,
            ``attention``, ``grad_checkpointing``, ``grad_accum_steps``, ``device``,
            ``fused_optimizer``, ``overhead``, ``optimizer``).

    Returns:
        A :class:`ParallelMemoryEstimate`.

    Raises:
        ConfigError: ``nproc < 1``, unknown ``parallelism``, FSDP with Muon (lmkit refuses it), and
            whatever :func:`~lmkit.analysis.memory.estimate_memory` refuses.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: must be at least 1")
    if parallelism not in PARALLELISMS:
        raise ConfigError(f"--parallelism {parallelism}: use ddp or fsdp")
    if parallelism == "fsdp" and kwargs.get("optimizer", "adamw") != "adamw":
        raise ConfigError(f"--parallelism fsdp: training.optimizer {kwargs['optimizer']} is not supported "
                          "with FSDP; use adamw")
    single = estimate_memory(cfg, batch_size, **kwargs)
    step1 = single if single.grad_accum_steps == 1 else estimate_memory(cfg, batch_size,
                                                                        **{**kwargs, "grad_accum_steps": 1})
    device = single.device
    overhead = kwargs.get("overhead") or (FrameworkOverhead() if device == "cuda" else FrameworkOverhead(0, 0.0, 0))
    pc = count_params(cfg)
    P, L, Pl = pc.total, cfg.n_layer, pc.per_layer
    weights, optim = single.row("weights").size_bytes, single.row("optimizer state").size_bytes
    workspace = overhead.workspace_bytes if device == "cuda" else 0
    others = [r for r in single.rows if r.name not in ("weights", "gradients", "optimizer state", "cuBLAS workspace")]

    def other_rows(live: dict[str, int]) -> list[MemoryRow]:
        return [MemoryRow(r.name, r.size_bytes, _at_peak(r, live, single), r.formula) for r in others]

    if parallelism == "ddp":
        buckets = 4 * P
        best = max(single.phases, key=lambda e: sum(e[1].values()))
        phase, live = best
        peak = weights + optim + buckets + sum(live.values()) + workspace
        rows = [
            single.row("weights"),
            MemoryRow("gradients", 4 * P, live["gradients"], "4 B × params (fp32 .grad, a full replica)"),
            single.row("optimizer state"),
            MemoryRow("DDP gradient buckets", buckets, buckets,
                      f"4 B × params: ~{ddp_bucket_count(buckets)} flat buckets (≤ 25 MiB, first 1 MiB) that "
                      "DDP copies each .grad into and all-reduces (gradient_as_bucket_view=False)"),
            *other_rows(live),
        ]
        model_state = weights + 4 * P + optim + buckets
    else:
        R = P - L * Pl
        s_block = shard_numel(block_shapes, nproc) if block_shapes is not None else -(-Pl // nproc)
        s_root = shard_numel(root_shapes, nproc) if root_shapes is not None else -(-R // nproc)
        local = s_root + L * s_block
        rs_block, rs_root = 4 * nproc * s_block, 4 * nproc * s_root  # a reduce-scatter's padded flat input
        accum = single.grad_accum_steps > 1
        A_layer = sum(single.per_layer.values()) if single.grad_checkpointing else 0
        candidates = []

        def add(phase: str, rest: dict[str, int], unsharded: int, full_grads: int, done_shards: int,
                rs: int) -> None:
            sharded = 4 * local if accum else done_shards
            grads = sharded + full_grads
            total = 12 * local + unsharded + grads + rs + sum(rest.values())
            candidates.append((total, phase, unsharded, grads, full_grads, rs, {**rest, "gradients": grads}))

        phases = step1.phases
        after_blocks = False
        for i, (phase, live1) in enumerate(phases):
            m = _BLOCK.match(phase)
            j = int(m.group(1)) if m else None
            rest = {k: v for k, v in live1.items() if k != "gradients"}
            if phase == "optimizer step":  # every group resharded; the step runs on the shards
                rest["temporaries"] = int(live1["temporaries"] * local / P)
                add(phase, rest, 0, 0, 4 * local, 0)
                continue
            done = (L - j) if j is not None else (L if after_blocks else 0)
            root_grads = live1["gradients"] - done * 4 * Pl  # the root's full-size gradients so far
            if j is not None:
                # the root, this block and the one prefetched; the block after it still in its reduce-scatter
                add(phase, rest, 4 * R + 4 * Pl + (4 * Pl if j > 0 else 0), root_grads + 4 * Pl,
                    4 * (done - 1) * s_block, rs_block if j < L - 1 else 0)
                # this block's post-backward: resharded, its gradients copied into a new reduce-scatter input
                nxt = dict(phases[i + 1][1]) if i + 1 < len(phases) else dict(live1)
                nxt.pop("gradients")
                nxt["temporaries"] = 0
                if i + 1 < len(phases) and _BLOCK.match(phases[i + 1][0]):
                    nxt["activations"] = max(0, nxt["activations"] - A_layer)  # not yet recomputed
                add(f"block {j} reduce-scatter", nxt, 4 * R + (4 * Pl if j > 0 else 0), root_grads + 4 * Pl,
                    4 * done * s_block, rs_block)
                after_blocks = j == 0 or after_blocks
                continue
            if after_blocks:  # family stages after the blocks, the embedding backward
                add(phase, rest, 4 * R, root_grads, 4 * L * s_block, rs_block if L else 0)
                if phase == "embedding backward":  # the root's post-backward
                    add("root reduce-scatter", {k: 0 for k in rest}, 0, root_grads,
                        4 * (L * s_block + s_root), rs_root)
            else:  # the end of forward and the head's backward: the root and the last block (prefetched)
                prefetched = 0 if phase.startswith("forward end") or not L else 4 * Pl
                add(phase, rest, 4 * R + prefetched, root_grads, 0, 0)
        total, phase, unsharded, grads, full_grads, rs, live = max(candidates, key=lambda c: c[0])
        peak = total + workspace
        rows = [
            MemoryRow("weights", 4 * local, 4 * local, f"4 B × {local:,} params: a 1/{nproc} shard (dim 0 padded)"),
            MemoryRow("gradients", 4 * local, grads,
                      f"4 B × shard; at the peak {_fmt(full_grads)} of them unsharded (the groups in backward)"),
            MemoryRow("optimizer state", 8 * local, 8 * local, "AdamW exp_avg + exp_avg_sq on the shard: 8 B × shard"),
            MemoryRow("unsharded parameters (all-gathered)", 4 * R + 8 * Pl, unsharded,
                      f"fp32: the root {_fmt(4 * R)} + the block in use and the prefetched one, {_fmt(4 * Pl)} each"),
            MemoryRow("reduce-scatter buffers", max(rs_block, rs_root), rs,
                      "the flat input of the last reduce-scatter (FSDP keeps one in flight)"),
            *other_rows(live),
        ]
        model_state = 16 * local
    over = overhead.total(peak) if device == "cuda" else 0
    if workspace:
        rows.append(single.row("cuBLAS workspace"))
    return ParallelMemoryEstimate(parallelism=parallelism, nproc=nproc, batch_size=single.batch_size,
                                  seq_len=single.seq_len, precision=single.precision, device=device, n_params=P,
                                  rows=rows, model_state=model_state, peak_allocated=peak, peak_phase=phase,
                                  overhead=over, total=peak + over, single=single)


def group_shapes(model: Any) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """``(block_shapes, root_shapes)`` of a built lmkit model (the meta device is enough): the
    parameter shapes of its first transformer block (:func:`lmkit.models.base.transformer_blocks`:
    FSDP's per-block groups) and of every other distinct parameter (the
    root group), for :func:`estimate_parallel_memory`'s exact FSDP padding.

    Raises:
        ConfigError: the model has no transformer blocks to shard.
    """
    from lmkit.models.base import transformer_blocks

    blocks = list(transformer_blocks(model))
    if not blocks:
        raise ConfigError(f"{type(model).__name__}: no transformer blocks (a ModuleList named h or blocks) to shard")
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    block = [tuple(p.shape) for p in blocks[0].parameters()]
    root = [tuple(p.shape) for p in model.parameters() if id(p) not in in_blocks]  # parameters(): shared once
    return block, root


def _at_peak(row: MemoryRow, live: dict[str, int], single: MemoryEstimate) -> int:
    """A single-process row's bytes alive at the rank's peak phase (``live``: that phase's parts)."""
    key = {"activations": "activations", "autocast weight copies": "autocast copies",
           "embeddings + final norm": "embeddings + final norm", "logits + loss": "logits + loss",
           "backward temporaries": "temporaries"}.get(row.name, row.name)
    if row.name == "  of which attention scores":
        per_layer = sum(single.per_layer.values())
        scores = single.per_layer.get("attention scores", 0)
        acts = live.get("activations", 0)
        return int(scores * acts / per_layer) if scores and per_layer and acts >= per_layer else 0
    return live.get(key, 0)


def _fmt(n: int) -> str:
    if n == 0:
        return "0"
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.3g} MiB"
