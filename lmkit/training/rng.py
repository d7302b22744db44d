"""RNG state as tensors and plain types, so a checkpoint restores it exactly.

Every generator that can change the next step is captured: python's ``random``,
numpy's global generator, torch's CPU generator and, on CUDA, every device's
generator. All of it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain types (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> list[str]:
    """Restore what :func:`rng_state` captured.

    Returns:
        Notes on what could not be restored (empty when everything was): CUDA states are
        restored only when the number of visible devices matches; otherwise the
        continuation is not bitwise the run that never stopped, and the caller says so.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if not cuda:
        return []
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
        return []
    return [f"the checkpoint holds the CUDA RNG state of {len(cuda)} device(s) but {visible} are visible now, so it "
            "was not restored: dropout and sampling on the GPU draw new numbers and the continuation is not bitwise "
            "the uninterrupted run (resume with the same CUDA_VISIBLE_DEVICES to keep it exact)"]


__all__ = ["rng_state", "seed_everything", "set_rng_state"]
