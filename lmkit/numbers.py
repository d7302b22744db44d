"""Number helpers every layer may use (no lmkit imports, no torch).

:func:`finite` is the one JSON-safe conversion of results: JSON has no ``inf``/``nan``, so
every non-finite float becomes ``None`` (``null``) before a result, report or event is written.
"""

from __future__ import annotations

import math
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (``inf``, ``-inf``, ``nan``) replaced by ``None``,
    recursively through dicts, lists and tuples (tuples come back as lists, as JSON has them).
    Anything else (ints, strings, bools, ``None``, other objects) is returned unchanged.

    Example: ``finite({"ppl": float("inf"), "xs": (1.0, float("nan"))})`` ->
    ``{"ppl": None, "xs": [1.0, None]}``.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
