"""The adaptive-SVD timeline of a run, read back from ``runs/NAME/svd.jsonl``.

Each line is one :meth:`lmkit.events.SVDAnalysis.to_dict` (``kind``, ``time``, ``step``,
``layer``, ``mode``, ``r``, ``r_next``, ``metrics``, ``reason``, ``action``, ``mode_after``,
``r_after``, ``seconds``), written by the adaptive-SVD training hook once per layer and analysis.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: The ``action`` values that are a mode switch.
SWITCH_ACTIONS = ("to_lowrank", "to_full")


def read_svd_log(path: Path) -> dict[str, Any]:
    """The adaptive-SVD timeline from ``svd.jsonl`` (one :meth:`lmkit.events.SVDAnalysis.to_dict`
    per line).

    Lines that are not a JSON object with an integer ``step`` and a string ``layer`` are
    skipped and counted (``skipped_lines``), never fatal. When a step of a layer appears twice
    (a resumed run that analysed it again) the later record wins.

    Returns:
        ``path``, ``records`` (kept), ``skipped_lines``, ``layers`` -- per layer, in step order,
        parallel lists ``step``, ``mode``, ``r``, ``r_next``, ``mode_after``, ``r_after``,
        ``reason``, ``action``, ``seconds`` and ``metrics`` {metric: [value or None]} --,
        ``switches`` ``[{step, layer, from_mode, to_mode, r, reason}]`` (actions ``to_lowrank``
        / ``to_full``) and ``refactors`` ``[{step, layer, r, r_after, reason}]``, in step order.
    """
    skipped = 0
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        raw = path.read_bytes()
    except OSError:
        raw = b""
        skipped = 1
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        step = rec.get("step") if isinstance(rec, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or not isinstance(rec.get("layer"), str):
            skipped += 1
            continue
        by_key[(rec["layer"], step)] = rec
    layers: dict[str, dict[str, Any]] = {}
    switches: list[dict[str, Any]] = []
    refactors: list[dict[str, Any]] = []
    fields = ("mode", "r", "r_next", "mode_after", "r_after", "reason", "action", "seconds")
    for (layer, step), rec in sorted(by_key.items(), key=lambda item: (item[0][1], item[0][0])):
        entry = layers.setdefault(layer, {"step": [], **{f: [] for f in fields}, "metrics": {}})
        n = len(entry["step"])
        entry["step"].append(step)
        for f in fields:
            entry[f].append(rec.get(f))
        metrics = rec.get("metrics") if isinstance(rec.get("metrics"), dict) else {}
        for key in metrics:
            entry["metrics"].setdefault(key, [None] * n)
        for key, values in entry["metrics"].items():
            values.append(_number(metrics.get(key)))
        action = rec.get("action")
        if action in SWITCH_ACTIONS:
            switches.append({"step": step, "layer": layer, "from_mode": rec.get("mode"),
                             "to_mode": rec.get("mode_after"), "r": rec.get("r_after"), "reason": rec.get("reason")})
        elif action == "refactor":
            refactors.append({"step": step, "layer": layer, "r": rec.get("r"), "r_after": rec.get("r_after"),
                              "reason": rec.get("reason")})
    return {"path": str(path), "records": len(by_key), "skipped_lines": skipped, "layers": layers,
            "switches": switches, "refactors": refactors, "thresholds": None}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
