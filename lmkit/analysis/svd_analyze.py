"""``lmkit svd-analyze``: the spectra of a run's weight matrices across its checkpoints.

Reads checkpoints only (no data, no training). For every selected weight matrix at every
selected checkpoint: the singular values and the metrics of :func:`lmkit.analysis.spectral.spectrum_metrics`;
between consecutive checkpoints: the largest principal angle between the top-k left singular
subspaces and the share of the change ``ΔW`` lying in the previous top-k subspace. Layers with
``effective_weight()`` (:class:`lmkit.models.svd_linear.AdaptiveSVDLinear`) are analysed through
their effective weight (``W`` or ``W_p + B A``), with ``k = g - r`` once ``r`` is set. When the run
has ``svd.jsonl`` (one :class:`lmkit.events.SVDAnalysis` record per line), the report adds the
adaptive-SVD timeline: modes, r and metrics per layer over steps, and every switch with its reason.

The library never prints: progress is :class:`SVDAnalyzeProgress` events through ``emit``.

``analysis.json`` (:meth:`SVDReport.to_dict`), ``format: 1``:

* ``run`` (folder), ``name``, ``k`` (the ``--k`` default), ``layer_patterns`` (``--layers``),
  ``heavy_tail`` (whether the power-law fits ran);
* ``checkpoints``: ``[{step, file, tokens, val_loss}]`` in step order;
* ``layers``: ``{name: {shape [m, n], kind ("linear", "embedding", or "adaptive_svd" when it is
  one at any analysed checkpoint), aliases
  (other names of the same tensor, e.g. a tied head), checkpoints: [record]}}`` with one record per
  checkpoint where the layer exists: ``step``, ``mode`` / ``r`` (adaptive-SVD layers, else
  null), ``k``, ``singular_values`` (descending, 7 significant digits), every key of
  ``spectrum_metrics`` (``effective_rank``, ``stable_rank``, ``energy_rank_90/99/999``,
  ``condition_number``, ``spectral_norm``, ``frobenius_norm``, ``alpha``, ``alpha_weighted``,
  ``log_spectral_norm``, ``log_norm``, ``log_alpha_norm``, ``mp_softrank``, ``powerlaw``), and vs
  the previous checkpoint: ``subspace_angle`` (radians), ``delta_in_topk`` (``‖P_prev ΔW‖_F /
  ‖ΔW‖_F``), ``relative_change`` (``‖ΔW‖_F / ‖W_prev‖_F``) -- null at the first checkpoint,
  when the shape changed or when ``ΔW = 0`` (``delta_in_topk``); a weight with NaN/inf values gets
  only ``step``, ``mode``, ``r``, ``k`` (null) and ``error``;
* ``svd_log``: null without ``svd.jsonl``, else :func:`lmkit.analysis.svd_log.read_svd_log`'s dict (``path``,
  ``records``, ``skipped_lines``, ``layers`` {name: {step, mode, r, r_next, mode_after, r_after,
  reason, action, metrics {name: [...]}}} as parallel lists, ``switches``, ``refactors``,
  ``thresholds``);
* ``files``: the PNGs written (added by the CLI / :func:`write_outputs`).
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lmkit.errors import CheckpointError, ConfigError
from lmkit.events import Event, null_emit

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = 1


@dataclass(frozen=True)
class SVDAnalyzeProgress(Event):
    """One matrix of one checkpoint analysed: ``completed`` of ``total`` (checkpoints x layers)."""

    kind: ClassVar[str] = "svd_analyze_progress"
    completed: int
    total: int
    step: int
    layer: str


@dataclass
class SVDReport:
    """What :func:`analyze_run` found; :meth:`to_dict` is ``analysis.json``."""

    run: Path
    name: str
    k: int
    layer_patterns: list[str]
    heavy_tail: bool
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    svd_log: dict[str, Any] | None = None
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _json_safe({"format": FORMAT, "run": str(self.run), "name": self.name, "k": self.k,
                           "layer_patterns": self.layer_patterns, "heavy_tail": self.heavy_tail,
                           "checkpoints": self.checkpoints, "layers": self.layers, "svd_log": self.svd_log,
                           "files": self.files})

    def rows(self, step: int) -> list[dict[str, Any]]:
        """The table rows of one checkpoint: ``{layer, shape, kind, mode, r, k, ...record}``."""
        out = []
        for name, layer in self.layers.items():
            for rec in layer["checkpoints"]:
                if rec["step"] == step:
                    out.append({"layer": name, "shape": layer["shape"], "kind": layer["kind"], **rec})
        return out


# --------------------------------------------------------------------------- selection


def select_checkpoints(run_dir: Path, names: Iterable[str]) -> list[tuple[int, Path]]:
    """The checkpoint files to analyse, ``(step, path)`` in step order.

    ``all`` (the default) is every distinct checkpoint (:func:`lmkit.runs.list_checkpoints`:
    ``latest``/``best`` are hard links of a periodic one and count once); other names
    (``best``, ``latest``, ``step_…``, ``epoch_…``, a path) are resolved as
    :func:`lmkit.runs.load_run` does (``best`` falls back to ``latest``). A file named twice
    (the same file on disk) is analysed once; a copy is analysed as a checkpoint of its own.

    Raises:
        CheckpointError: no checkpoints, or a named one is missing or unreadable.
    """
    from lmkit.runs import list_checkpoints
    from lmkit.training.checkpoint import existing_checkpoint, peek_step

    directory = run_dir / "checkpoints"
    chosen: list[tuple[int, Path]] = []
    for name in list(names) or ["all"]:
        if name == "all":
            found = list_checkpoints(run_dir)
            if not found:
                raise CheckpointError(f"{run_dir}: no checkpoints (nothing in {directory})")
            chosen.extend(found)
            continue
        path = existing_checkpoint(directory, name, run_dir, best_falls_back=True)
        step = peek_step(path)
        if step is None:
            raise CheckpointError(f"{path}: cannot be read as a checkpoint")
        chosen.append((step, path))
    unique: list[tuple[int, Path]] = []
    for step, path in chosen:
        if not any(_same_checkpoint(path, p) for _, p in unique):
            unique.append((step, path))
    return sorted(unique, key=lambda item: item[0])  # stable: same-step files keep their order


def _same_checkpoint(a: Path, b: Path) -> bool:
    """The same file on disk; for sharded folders (``*.dcp``), folders whose manifests are one
    file (``latest``/``best`` are folders of hard links to a periodic one's files)."""
    if a.is_dir() and b.is_dir():
        from lmkit.training.sharded import MANIFEST

        a, b = a / MANIFEST, b / MANIFEST
        if not (a.exists() and b.exists()):
            return a.parent.samefile(b.parent)
    return a.samefile(b)


def weight_matrices(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The analysable matrices of a model: the input embedding, then every module of
    ``target_modules("all")`` with a 2-D weight, in that order, by module name.

    Each value: ``module``, ``kind`` (``embedding``, ``linear``, ``adaptive_svd``), ``aliases``
    (other module names of the same tensor: a head tied to the embedding is listed once, under
    the embedding's name, with ``lm_head`` as an alias).
    """
    from torch import nn

    names = {id(m): n for n, m in model.named_modules()}
    candidates: list[tuple[str, nn.Module]] = []
    embedding = model.input_embedding() if hasattr(model, "input_embedding") else None
    if embedding is not None and id(embedding) in names:
        candidates.append((names[id(embedding)], embedding))
    if hasattr(model, "target_modules"):
        candidates.extend(model.target_modules("all").items())
    out: dict[str, dict[str, Any]] = {}
    seen: dict[int, str] = {}  # id of the weight tensor -> the entry that owns it
    for name, module in candidates:
        adaptive = callable(getattr(module, "effective_weight", None))
        weight = getattr(module, "weight", None)
        if not adaptive and (weight is None or weight.dim() != 2):
            continue
        if weight is not None and id(weight) in seen:
            owner = seen[id(weight)]
            if owner != name and name not in out[owner]["aliases"]:
                out[owner]["aliases"].append(name)
            continue
        if weight is not None:
            seen[id(weight)] = name
        kind = "adaptive_svd" if adaptive else ("embedding" if isinstance(module, nn.Embedding) else "linear")
        out[name] = {"module": module, "kind": kind, "aliases": []}
    return out


def match_layers(available: dict[str, dict[str, Any]], patterns: list[str]) -> list[str]:
    """The names whose module name, ``name.weight`` or an alias matches one of the
    ``fnmatch`` globs (all names without patterns), in model order.

    Raises:
        ConfigError: a pattern matches nothing (naming the first few layers there are).
    """
    if not patterns:
        return list(available)
    chosen = []
    for pattern in patterns:
        hits = [n for n, info in available.items()
                if any(fnmatch.fnmatchcase(c, pattern) for c in (n, f"{n}.weight", *info["aliases"]))]
        if not hits:
            shown = ", ".join(list(available)[:6]) + (", …" if len(available) > 6 else "")
            raise ConfigError(f"--layers {pattern!r} matches no weight matrix (have: {shown})")
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in available if n in chosen]


def current_weight(info: dict[str, Any]) -> tuple[torch.Tensor, str | None, int | None]:
    """``(W float32 on the CPU, mode, r)``: the effective weight of an adaptive-SVD layer (its
    ``mode`` and ``r``), else the weight (``None``, ``None``)."""
    import torch

    module = info["module"]
    with torch.no_grad():
        if info["kind"] == "adaptive_svd":
            w = module.effective_weight()
            return w.detach().to("cpu", torch.float32), getattr(module, "mode", None), getattr(module, "r", None)
        return module.weight.detach().to("cpu", torch.float32), None, None


# --------------------------------------------------------------------------- the analysis


def analyze_run(run: str | Path, *, checkpoints: Iterable[str] = ("all",), layers: Iterable[str] = (),
                k: int = 10, out_dir: str | Path = "runs", heavy_tail: bool = True,
                emit: Callable[[Event], None] = null_emit) -> SVDReport:
    """Analyse a run's checkpoints (module docstring).

    Args:
        run: a run folder or a name under ``out_dir``.
        checkpoints: names for :func:`select_checkpoints` (default ``all``).
        layers: ``fnmatch`` globs over weight names (:func:`match_layers`); default every matrix
            of :func:`weight_matrices`.
        k: the top-k subspace size of plain layers (adaptive-SVD layers use ``g - r`` once r is set).
        heavy_tail: run the power-law and MP fits (the slow part on small matrices).
        emit: receives one :class:`SVDAnalyzeProgress` per matrix and checkpoint.

    Raises:
        ConfigError: no such run; ``k < 1``; a glob matches nothing.
        CheckpointError: no checkpoints; a named checkpoint missing or corrupt.
    """
    from lmkit.rundir import RunDir
    from lmkit.runs import load_run

    if k < 1:
        raise ConfigError(f"--k {k}: the subspace size must be at least 1")
    run_dir = RunDir.existing(run, out_dir)
    selected = select_checkpoints(run_dir.path, checkpoints)
    patterns = list(layers)
    report = SVDReport(run=run_dir.path, name=run_dir.path.name, k=k, layer_patterns=patterns, heavy_tail=heavy_tail)
    names: list[str] | None = None
    previous: dict[str, Any] = {}  # layer -> LeftSubspaces of the previous checkpoint
    total = done = 0
    thresholds = None
    for index, (_, path) in enumerate(selected):
        loaded = load_run(run_dir.path, str(path), fold=False)  # adaptive-SVD layers stay (mode, r)
        available = weight_matrices(loaded.model)
        if names is None:
            names = match_layers(available, patterns)
            total = len(names) * len(selected)
        svd_config = getattr(loaded.config, "svd", None)
        if svd_config is not None and hasattr(svd_config, "resolved_thresholds"):
            thresholds = svd_config.resolved_thresholds()
        report.checkpoints.append({"step": loaded.step, "file": str(path), "tokens": loaded.tokens,
                                   "val_loss": loaded.val_loss})
        need_subspace = index < len(selected) - 1
        for name in names:
            done += 1
            info = available.get(name)
            if info is None:
                emit(SVDAnalyzeProgress(completed=done, total=total, step=loaded.step, layer=name))
                continue
            w, mode, r = current_weight(info)
            entry = report.layers.setdefault(name, {"shape": list(w.shape), "kind": info["kind"],
                                                    "aliases": info["aliases"], "checkpoints": []})
            if info["kind"] == "adaptive_svd":  # became one after the first checkpoint
                entry["kind"] = "adaptive_svd"
            record, basis = matrix_record(w, mode, r, k=k, step=loaded.step, previous=previous.pop(name, None),
                                          keep_basis=need_subspace, heavy_tail=heavy_tail)
            if basis is not None:
                previous[name] = basis
            entry["checkpoints"].append(record)
            emit(SVDAnalyzeProgress(completed=done, total=total, step=loaded.step, layer=name))
        del loaded, available
    from lmkit.analysis.svd_log import read_svd_log

    log_path = run_dir.path / "svd.jsonl"
    if log_path.is_file():
        report.svd_log = read_svd_log(log_path)
        report.svd_log["thresholds"] = thresholds
    return report


def matrix_record(w: torch.Tensor, mode: str | None, r: int | None, *, k: int, step: int, previous: Any,
                  keep_basis: bool, heavy_tail: bool = True) -> tuple[dict[str, Any], Any]:
    """One matrix at one checkpoint: its ``analysis.json`` record and, with ``keep_basis``, its
    :class:`~lmkit.analysis.spectral.LeftSubspaces` for the next checkpoint (else ``None``).

    ``previous``: the previous checkpoint's basis of this layer or ``None``. The top-k size is
    ``g - r`` when ``r`` is set (adaptive-SVD layers), else ``k``, clamped to ``[1, g]``. A weight
    with NaN/inf values gets an ``error`` record and no basis (nothing is compared across it).
    """
    import torch

    from lmkit.analysis.spectral import (
        LeftSubspaces,
        delta_in_subspace,
        largest_principal_angle,
        singular_values,
        spectrum_metrics,
    )

    if not bool(torch.isfinite(w).all()):  # a diverged checkpoint: say so, analyse the rest
        return {"step": step, "mode": mode, "r": r, "k": None, "error": "non-finite values in the weight"}, None
    shape = (int(w.shape[0]), int(w.shape[1]))
    g = min(shape)
    s = singular_values(w)
    top_k = max(1, min(g, g - r if r is not None else k))
    record: dict[str, Any] = {"step": step, "mode": mode, "r": r, "k": top_k,
                              "singular_values": [float(f"{v:.7g}") for v in s.tolist()],
                              **spectrum_metrics(s, shape, heavy_tail=heavy_tail),
                              "subspace_angle": None, "delta_in_topk": None, "relative_change": None}
    basis = LeftSubspaces(w) if keep_basis or previous is not None else None
    if previous is not None and tuple(previous.weight.shape) == shape:
        u_prev, u_cur = previous.top(top_k), basis.top(top_k)
        delta = w - previous.weight
        if u_prev is not None and u_cur is not None:
            record["subspace_angle"] = largest_principal_angle(u_prev, u_cur)
            record["delta_in_topk"] = delta_in_subspace(u_prev, delta)
        prev_norm = float(torch.linalg.matrix_norm(previous.weight))
        record["relative_change"] = float(torch.linalg.matrix_norm(delta)) / prev_norm if prev_norm > 0 else None
    return record, basis if keep_basis else None


# --------------------------------------------------------------------------- outputs


def write_outputs(report: SVDReport, out: Path) -> list[Path]:
    """Write ``analysis.json`` and the PNGs (:mod:`lmkit.analysis.svd_plots`) into ``out``;
    returns the paths written (``analysis.json`` first) and records the PNGs in ``report.files``."""
    from lmkit.analysis.svd_plots import plot_report

    out.mkdir(parents=True, exist_ok=True)
    pngs = plot_report(report, out)
    report.files = [str(p) for p in pngs]
    json_path = out / "analysis.json"
    json_path.write_text(json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return [json_path, *pngs]


def _json_safe(value: Any) -> Any:
    """Non-finite floats -> None (JSON has no NaN/inf), tuples -> lists, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return str(value)
