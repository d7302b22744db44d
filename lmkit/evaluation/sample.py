"""Text samples from a run: the model continues each prompt (a look at what it learned).

Each prompt is encoded with the run's tokenizer, preceded by its BOS token when it has one
(the arithmetic ``char`` tokenizer does; the training sequences start with it). An empty
prompt starts from BOS, else EOS (the document separator), else ``"\\n"``. Continuations
come from :func:`lmkit.evaluation.generate.generate_ex` (KV cache, batched): sampled from
``softmax(logits / temperature)`` over the ``top_k`` most likely tokens with a
``torch.Generator`` seeded with ``seed`` -- the same run, prompts, options and batch size
give the same texts -- or greedy when ``temperature == 0``. A sample ends at EOS, after
``max_new_tokens`` tokens, or when the context (``block_size``) is full.

Options read from ``ctx.options`` (``None`` = default):
    prompt (list[str], default ``[""]``): one sample per prompt.
    temperature (float >= 0, default 0.8), top_k (int >= 1, default 200; larger than the
    vocabulary = no cut), max_new_tokens (int >= 1, default 200), seed (int, default 1337)
    -- nanoGPT's ``sample.py`` defaults.

Metrics: ``n_samples`` and ``mean_new_tokens`` (headline). Details: per sample the prompt,
the generated text (``text``, without the prompt), the number of new tokens and why it
stopped.
"""

from __future__ import annotations

from typing import Any

from lmkit.errors import ConfigError
from lmkit.evaluation.task import EvalContext, TaskResult

VERSION = "1"
#: Metric directions (see :class:`lmkit.evaluation.task.TaskResult`): counts, no better value.
DIRECTIONS = {"n_samples": "neither", "mean_new_tokens": "neither"}
DEFAULTS: dict[str, Any] = {"prompt": [""], "temperature": 0.8, "top_k": 200, "max_new_tokens": 200,
                            "seed": 1337}


def _option(options: dict[str, Any], name: str) -> Any:
    value = options.get(name)
    return DEFAULTS[name] if value is None else value


def prompt_ids(tokenizer: Any, text: str, *, bos: bool | None = None) -> list[int]:
    """Token ids a sample starts from (see the module docstring). ``bos``: whether the run's
    training sequences begin with BOS (:func:`lmkit.data.sequences_start_with_bos`); ``None``:
    whenever the tokenizer has a BOS id."""
    bos_id = getattr(tokenizer, "bos_id", None) if bos is not False else None
    ids = ([bos_id] if bos_id is not None else []) + tokenizer.encode(text)
    if ids:
        return ids
    eos = getattr(tokenizer, "eos_id", None)
    return [eos] if eos is not None else tokenizer.encode("\n")


def evaluate(ctx: EvalContext) -> TaskResult:
    """Sample a continuation of every prompt.

    Raises:
        ConfigError: ``temperature`` < 0, ``top_k`` < 1, ``max_new_tokens`` < 1, a
            non-integer ``seed``, or a prompt list that is empty or not strings.
    """
    import torch

    from lmkit.evaluation.generate import generate_ex

    prompts = _option(ctx.options, "prompt")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"--prompt: give one or more prompt strings, got {prompts!r}")
    temperature = _option(ctx.options, "temperature")
    top_k = _option(ctx.options, "top_k")
    max_new = _option(ctx.options, "max_new_tokens")
    seed = _option(ctx.options, "seed")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ConfigError(f"--temperature must be a number >= 0, got {temperature!r}")
    for name, value in (("top-k", top_k), ("max-new-tokens", max_new)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name} must be an integer >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"--seed must be an integer, got {seed!r}")
    if ctx.limit is not None:
        prompts = prompts[: ctx.limit]

    tok = ctx.tokenizer
    try:
        generator = torch.Generator(device=ctx.device)
    except RuntimeError:  # a device without its own generator: sample on the CPU
        generator = torch.Generator()
    generator.manual_seed(seed)
    from lmkit.data import sequences_start_with_bos

    bos = sequences_start_with_bos(ctx.config.data)
    gen = generate_ex(ctx.model, [prompt_ids(tok, p, bos=bos) for p in prompts], max_new_tokens=max_new,
                      eos_id=tok.eos_id, temperature=float(temperature), top_k=top_k, generator=generator,
                      batch_size=ctx.batch_size, progress=ctx.progress)
    samples = [{"prompt": p, "text": tok.decode(ids), "n_new_tokens": len(ids), "finish": finish,
                "prompt_truncated": cut}
               for p, ids, finish, cut in zip(prompts, gen.tokens, gen.finish, gen.prompt_truncated, strict=True)]
    n = len(samples)
    return TaskResult(
        task="sample",
        version=VERSION,
        metrics={"n_samples": float(n), "mean_new_tokens": sum(s["n_new_tokens"] for s in samples) / n},
        headline="mean_new_tokens",
        directions=DIRECTIONS,
        n_items=n,
        details={"temperature": float(temperature), "top_k": top_k, "max_new_tokens": max_new, "seed": seed,
                 "samples": samples},
    )
