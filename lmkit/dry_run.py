"""``lmkit train --dry-run``: what a run would be, without training or writing anything.

:func:`plan_run` resolves the config, counts the parameters on PyTorch's ``meta`` device
(no memory: a 124M preset is instant), estimates the device memory of one training step
(:func:`lmkit.analysis.memory.estimate_memory`, as ``lmkit doctor`` does) and plans the
length of the run: optimizer steps, tokens per step, total tokens and epochs.

The plan is **exact** when the training split's size is known without tokenizing: the
built-in arithmetic task and arithmetic JSONL files (generated/read in memory), or text whose
token cache entry already exists (``~/.cache/lmkit/tokens/``: the same entry training would
reuse, found by its cache key for local files, by data set name and tokenizer for hub
sources). Otherwise it is **estimated** from the data's size in bytes -- local files' sizes
(less ``data.val_fraction`` of a single file), or the published size of a hub data set --
divided by a typical bytes-per-token of the tokenizer (:data:`BYTES_PER_TOKEN`), and marked
``"estimated"``. ``training.max_steps`` fixes steps and tokens exactly either way; only the
epoch count then depends on the data.

Nothing is written: no run folder, no token cache, no Hugging Face ``datasets`` cache (local
text files are hashed, not loaded).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lmkit.config import RunConfig
from lmkit.errors import ConfigError, DataError

#: Typical UTF-8 bytes per token of each tokenizer on English text, for estimates only:
#: byte/char 1 (char: ASCII text); GPT-2's BPE 4.6 (measured: 1,146,846 bytes of WikiText-2's
#: ``wiki.valid.raw`` -> 249,887 tokens, line by line); lmkit's trained ``bpe`` with 8,192 ids
#: 3.5 (TinyShakespeare: 0.9 x 1,115,394 bytes -> 287,585 train tokens).
BYTES_PER_TOKEN = {"byte": 1.0, "char": 1.0, "gpt2": 4.6, "gpt2+mul": 4.6, "bpe": 3.5}
_DEFAULT_BYTES_PER_TOKEN = 4.0

#: Approximate UTF-8 bytes of the training split of the hub data sets (the raw WikiText
#: train files: Merity et al. 2016, arXiv 1609.07843; Hugging Face ``Salesforce/wikitext``).
HUB_TRAIN_BYTES = {"wikitext-2-raw-v1": 10_918_892, "wikitext-103-raw-v1": 540_000_000}


def _attr(obj: Any, name: str, default: Any = None) -> Any:
    return getattr(obj, name, default)


def _find_cache(config: RunConfig) -> tuple[Any, str] | None:
    """The existing token cache entry training would use, and how it was found; ``None`` if none."""
    from lmkit.data import shards as sh
    from lmkit.data.sources import is_hub_name

    data = config.data
    if _attr(data, "sources") or _attr(data, "condition") is not None or _attr(data, "format", "text") != "text":
        return None  # mixtures, conditions, chat data: built from more than this module reproduces
    root = sh.cache_root(data) / "tokens"
    if not root.is_dir():
        return None
    if is_hub_name(data.dataset):
        matches = []
        for meta_path in sorted(root.glob(f"{sh._slug(data.dataset)}-*/meta.json")):
            entry = sh._load_existing(meta_path.parent)
            if (entry is not None and entry.meta.get("source", {}).get("dataset") == data.dataset
                    and entry.meta.get("tokenizer", {}).get("kind") == data.tokenizer.split(":")[0]):
                matches.append(entry)
        if len(matches) == 1:
            return matches[0], f"token cache {matches[0].directory} (matched by data set name and tokenizer)"
        return None
    fingerprint = local_fingerprint(data)
    if fingerprint is None:
        return None
    key = sh.cache_key(SimpleNamespace(fingerprint=fingerprint, streaming=False), data, ())
    directory = root / f"{sh._slug(data.dataset)}-{key}"
    entry = sh._load_existing(directory)
    return (entry, f"token cache {directory}") if entry is not None else None


def local_fingerprint(data: Any) -> str | None:
    """The :class:`~lmkit.data.sources.TextSource` fingerprint of local text files, computed
    from the files (hashed, not loaded through ``datasets``, so no cache is written): the same
    value :func:`lmkit.data.sources.load_text_source` gives. ``None`` when not a local path.

    Raises:
        DataError: an empty or undecodable file (the message training would give).
    """
    import hashlib

    from lmkit.data import sources as src

    path = Path(data.dataset).expanduser()
    if not path.exists():
        return None
    files = src.split_files(path)
    all_files = [f for group in files.values() for f in group]
    builder = src._builder_for(all_files)
    digest = hashlib.sha256(f"{builder}|{data.encoding}|{data.text_field}".encode())
    for split, group in sorted(files.items()):
        for file in group:
            file_hash = src.check_encoding(file, data.encoding) if builder == "text" else src._file_sha256(file)
            digest.update(f"{split}:{file.name}:{file_hash}".encode())
    fingerprint = digest.hexdigest()[:16]
    splits = {src._SPLIT_NAMES.get(k, k) for k in files}
    return fingerprint if "val" in splits else f"{fingerprint}-val{data.val_fraction}"


def _train_bytes(config: RunConfig) -> tuple[int | None, str]:
    """Bytes of text in the training split and where the number comes from."""
    from lmkit.data import sources as src

    data = config.data
    if _attr(data, "sources"):
        return None, "a mixture of sources: its size is known once tokenised"
    if data.dataset in HUB_TRAIN_BYTES:
        return HUB_TRAIN_BYTES[data.dataset], f"the published size of {data.dataset}'s train split"
    path = Path(data.dataset).expanduser()
    if not path.exists():
        if not src.is_hub_name(data.dataset):  # what training says for the same input
            known = ", ".join(["arithmetic", *src.HUB_SOURCES])
            raise DataError(f"data.dataset: {data.dataset!r} is not a file or folder, nor a known data set ({known})")
        return None, f"{data.dataset}: size unknown until it is downloaded"
    files = src.split_files(path)
    size = sum(f.stat().st_size for f in files["train"])
    if {src._SPLIT_NAMES.get(k, k) for k in files} >= {"val"}:
        return size, f"the size of the train file(s) of {path}"
    return int(size * (1 - data.val_fraction)), f"{path} less data.val_fraction {data.val_fraction}"


def _count_params(config: RunConfig, vocab_size: int | None) -> dict[str, Any]:
    from lmkit.models import build_model

    if vocab_size is None:
        return {"total": None, "note": "the vocabulary size depends on the data: give --set model.vocab_size=N"}
    model_cfg = config.model.model_copy()
    model_cfg.vocab_size = vocab_size
    model = build_model(model_cfg, device="meta")
    return {"total": model.num_params(), "non_embedding": model.num_params(exclude_embeddings=True),
            "vocab_size": vocab_size}


def _memory(config: RunConfig, vocab_size: int | None) -> dict[str, Any] | None:
    from lmkit.analysis import memory as mem

    if vocab_size is None:
        return None
    tcfg = config.training
    model_cfg = config.model.model_copy()
    model_cfg.vocab_size = vocab_size
    est = mem.estimate_memory(model_cfg, tcfg.batch_size, precision=tcfg.precision,
                              grad_checkpointing=tcfg.grad_checkpointing, grad_accum_steps=tcfg.grad_accum_steps,
                              device="cuda", optimizer=tcfg.optimizer)
    return {"peak_allocated_bytes": est.peak_allocated, "overhead_bytes": est.overhead, "total_bytes": est.total,
            "batch_size": est.batch_size, "seq_len": est.seq_len, "precision": est.precision,
            "optimizer": est.optimizer, "grad_checkpointing": est.grad_checkpointing, "peak_phase": est.peak_phase}


def _data_plan(config: RunConfig) -> dict[str, Any]:
    """Micro-batches per epoch (exact or estimated) and the vocabulary size the data gives."""
    from lmkit.analysis import memory as mem
    from lmkit.data import _is_arithmetic_jsonl, make_train_batches, prepare_data

    data, model, tcfg = config.data, config.model, config.training
    if data.dataset == "arithmetic" or _is_arithmetic_jsonl(data.dataset):
        prepared = prepare_data(data)  # generated or read in memory: writes nothing
        batches = make_train_batches(prepared, model.block_size, tcfg.batch_size, tcfg.seed)
        return {"exact": True, "source": prepared.description, "unit": "examples",
                "train_size": len(prepared.sequences["train"]), "micro_per_epoch": batches.batches_per_epoch,
                "vocab_size": model.vocab_size or prepared.tokenizer.vocab_size}
    try:
        vocab = mem.resolve_vocab_size(config)
    except ConfigError:
        vocab = None
    if data.format == "chat" and data.max_tokens is None and not data.dataset.startswith("hf:"):
        from lmkit.data.chat import load_chat_rows

        rows = load_chat_rows(data.dataset, encoding=data.encoding, val_fraction=data.val_fraction)  # reads, no tokens
        n_train = len(rows.splits["train"])
        return {"exact": True, "source": f"{n_train:,} training conversations of {data.dataset}", "unit": "examples",
                "train_size": n_train, "micro_per_epoch": math.ceil(n_train / tcfg.batch_size), "vocab_size": vocab}
    found = _find_cache(config)
    if found is not None:
        from lmkit.data.batching import TokenWindows

        entry, how = found
        windows = TokenWindows(entry.tokens("train"), model.block_size, tcfg.batch_size, tcfg.seed)
        return {"exact": True, "source": how, "unit": "tokens", "train_size": entry.count("train"),
                "val_size": entry.count("val") if "val" in entry.splits else None,
                "micro_per_epoch": windows.batches_per_epoch,
                "vocab_size": model.vocab_size or entry.meta.get("tokenizer", {}).get("vocab_size") or vocab}
    n_bytes, how = _train_bytes(config)
    per_token = BYTES_PER_TOKEN.get(data.tokenizer, _DEFAULT_BYTES_PER_TOKEN)
    tokens = None if n_bytes is None else int(n_bytes / per_token)
    if tokens is not None and data.max_tokens is not None:
        tokens = min(tokens, data.max_tokens)
    elif tokens is None and data.max_tokens is not None:
        tokens, how = data.max_tokens, "data.max_tokens, the token budget"
    micro = None if tokens is None else max(1, tokens // (tcfg.batch_size * model.block_size))
    source = (f"estimated from {how}" + (f" at ~{per_token:g} bytes/token" if n_bytes is not None else "")
              if tokens is not None else how)
    return {"exact": False, "source": source,
            "unit": "tokens", "train_size": tokens, "bytes": n_bytes, "bytes_per_token": per_token,
            "micro_per_epoch": micro, "vocab_size": vocab}


def plan_run(config: RunConfig) -> dict[str, Any]:
    """The dry-run report of ``config`` (plain JSON types).

    Keys: ``config`` (the resolved config as a dict), ``yaml`` (the same as ``config.yaml``
    would hold), ``params`` (``total``, ``non_embedding``, ``vocab_size``; ``total`` ``None``
    with a ``note`` when the vocabulary depends on data not yet tokenized), ``memory`` (bytes:
    ``peak_allocated_bytes``, ``overhead_bytes``, ``total_bytes`` of one CUDA training step),
    ``data`` (``exact``, ``source``, ``train_size`` in ``unit``, ``micro_per_epoch``) and
    ``plan`` (``max_steps``, ``steps_per_epoch``, ``tokens_per_step`` -- input tokens,
    padding included for example batches, as the trainer counts them -- ``total_tokens``,
    ``epochs``, ``exact``).

    Raises:
        ConfigError / DataError: what training would report for the same input (a missing
            file, an undecodable one); a hub data set is never downloaded here.
    """
    init_notes: list[str] = []
    if config.init_from:  # the architecture comes from the source (as the trainer does it)
        from lmkit.errors import CheckpointError, first_line
        from lmkit.training.init_from import load_init_source, merge_config

        config = config.model_copy(deep=True)
        try:
            source = load_init_source(config.init_from, out_dir=config.out_dir)
        except (ConfigError, CheckpointError, DataError) as exc:  # planning a pipeline whose source is not trained yet
            init_notes = [f"{config.init_from} cannot be read now ({first_line(exc)}); the model shown is the "
                          "config's, training takes the source's"]
        else:
            init_notes = [message for _, message in merge_config(config, source)]
    tcfg, model = config.training, config.model
    data = _data_plan(config)
    accum = tcfg.grad_accum_steps
    micro = data["micro_per_epoch"]
    tokens_per_step = tcfg.batch_size * accum * model.block_size
    steps_per_epoch = None if micro is None else max(1, math.ceil(micro / accum))
    if tcfg.max_steps is not None:
        max_steps: int | None = tcfg.max_steps
        steps_exact = True
    else:
        max_steps = None if micro is None else max(1, math.ceil(tcfg.epochs * micro / accum))
        steps_exact = data["exact"]
    epochs = None if (micro is None or max_steps is None) else max_steps * accum / micro
    plan = {"max_steps": max_steps, "steps_per_epoch": steps_per_epoch, "tokens_per_step": tokens_per_step,
            "total_tokens": None if max_steps is None else max_steps * tokens_per_step,
            "epochs": epochs, "steps_exact": steps_exact, "epochs_exact": data["exact"],
            "padded": data["unit"] == "examples"}
    vocab = data.get("vocab_size")
    return {"config": config.model_dump(mode="json"), "yaml": config.to_yaml(), "params": _count_params(config, vocab),
            "memory": _memory(config, vocab), "data": {k: v for k, v in data.items() if k != "vocab_size"},
            "plan": plan, "gpu_only": bool(tcfg.gpu_only), "notes": init_notes}


__all__ = ["BYTES_PER_TOKEN", "HUB_TRAIN_BYTES", "local_fingerprint", "plan_run"]
