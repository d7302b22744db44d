"""Export a run as plain weights for lmkit itself: ``model.safetensors`` + ``config.yaml``.

``model.safetensors`` holds the model's state dict under lmkit's own names (no
``_orig_mod.``/``module.`` prefixes). A tied head is stored once: ``lm_head.weight`` is
left out when ``model.tie_embeddings`` is true (safetensors refuses shared tensors), and
:func:`load_safetensors_export` re-ties it. ``config.yaml`` is the run's resolved config
(from the checkpoint), so ``RunConfig`` + ``build_model`` rebuild the architecture.
``tokenizer/`` is a copy of the run's tokenizer folder.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmkit.errors import CheckpointError, ConfigError, first_line
from lmkit.events import Event, Notice, null_emit
from lmkit.export import _folder
from lmkit.export.hf import DTYPES, ExportError, ExportResult

if TYPE_CHECKING:
    from torch import nn

    from lmkit.config import RunConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


def load_safetensors_export(folder: str | Path, *, dtype: Any = None) -> tuple[nn.Module, RunConfig]:
    """Rebuild the model of a ``--to safetensors`` export (eval mode, float32 unless ``dtype``).

    Raises:
        CheckpointError: missing or unreadable files, or weights that do not fit the config.
    """
    import torch
    from safetensors.torch import load_file

    from lmkit.config import RunConfig, read_yaml
    from lmkit.models import build_model

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder}: not an lmkit safetensors export (needs {WEIGHTS_FILE} and {CONFIG_FILE})")
    config = RunConfig.model_validate(read_yaml(folder / CONFIG_FILE))
    model = build_model(config.model)
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: cannot be read ({first_line(exc)})") from None
    if config.model.tie_embeddings:
        state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    state = {k: v.to(torch.float32) for k, v in state.items()}
    try:
        model.prepare_load(state)  # a layer-swapping feature's adapters (the model interface)
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{folder}: weights do not fit config.yaml ({first_line(exc)})") from None
    if dtype is not None:
        model.to(dtype)
    return model.eval(), config


def export_safetensors(run: str | Path, out: str | Path, *, checkpoint: str = "best", dtype: str = "float32",
                       verify: bool = True, force: bool = False, out_dir: str | Path = "runs",
                       emit: Callable[[Event], None] = null_emit) -> ExportResult:
    """Write ``out`` with ``model.safetensors``, ``config.yaml``, ``tokenizer/`` and ``lmkit_export.json``.

    Verification reloads the folder with :func:`load_safetensors_export` and requires its
    logits on random ids to equal the checkpoint's (bit for bit in float32; after the same
    rounding for ``bfloat16``/``float16``).

    Raises:
        ConfigError: bad ``dtype`` or ``out`` non-empty without ``force`` (exit 2).
        CheckpointError / DataError: the run cannot be loaded (exit 2).
        ExportError: the reloaded weights differ; ``out`` is marked failed (exit 1).
    """
    import torch
    from safetensors.torch import save_file

    from lmkit.export.hf import rounded_copy
    from lmkit.runs import load_run
    from lmkit.training.checkpoint import clean_state_dict

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: unknown dtype (choose {', '.join(DTYPES)})")
    out = Path(out)
    _folder.check_out(out, force)
    loaded = load_run(run, checkpoint, device="cpu", out_dir=out_dir)
    emit(Notice("info", f"loaded {loaded.checkpoint} (step {loaded.step:,}) -> {WEIGHTS_FILE}, {dtype}"))
    torch_dtype = getattr(torch, dtype)
    state = clean_state_dict(loaded.model.state_dict())
    if loaded.config.model.tie_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in state.items()}
    metadata: dict[str, Any] = {
        "format": 1, "kind": "safetensors", "status": "unverified",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"run": str(loaded.run.path.resolve()), "run_name": loaded.run.name,
                   "checkpoint": str(loaded.checkpoint.resolve()), "checkpoint_name": loaded.checkpoint.stem,
                   "step": loaded.step, "tokens": loaded.tokens, "val_loss": loaded.val_loss,
                   "preset": loaded.config.preset},
        "dtype": dtype, "versions": _folder.versions(), "tied_head_stored_once": loaded.config.model.tie_embeddings,
    }
    tmp = _folder.temp_folder(out)
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "lmkit_dtype": dtype})
        (tmp / CONFIG_FILE).write_text(loaded.config.to_yaml(), encoding="utf-8")
        if loaded.run.tokenizer_dir.is_dir():
            shutil.copytree(loaded.run.tokenizer_dir, tmp / "tokenizer")
        emit(Notice("info", f"wrote {', '.join(sorted(p.name for p in tmp.iterdir()))}"))
        if verify:
            reloaded, _ = load_safetensors_export(tmp)
            native = rounded_copy(loaded.model, torch_dtype)
            idx = torch.randint(0, loaded.config.model.vocab_size, (2, loaded.config.model.block_size),
                                generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                diff = float((native(idx)[0] - reloaded(idx)[0]).abs().max())
            metadata["verification"] = {"passed": diff == 0.0, "max_abs_diff": {"random": diff},
                                        "tolerance": 0.0, "compared_in": "float32 on cpu"}
            if diff != 0.0:
                reason = f"reloaded weights give other logits (max |Δ| = {diff:.3g})"
                _folder.mark_failed(tmp, reason, metadata)
                _folder.publish(tmp, out)
                raise ExportError(f"export FAILED verification: {reason}; {out} is marked failed")
            metadata["status"] = "verified"
        else:
            metadata["verification"] = None
        _folder.write_json(tmp / _folder.METADATA_FILE, metadata)
        _folder.publish(tmp, out)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, metadata["status"], metadata, sorted(p.name for p in out.iterdir()))
