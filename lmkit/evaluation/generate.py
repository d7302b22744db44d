"""Batched autoregressive generation with a KV cache: the one decoder behind ``sample``,
``gsm8k``, ``arithmetic-probes`` (and any task that generates).

How a batch runs:

1. Prompts are sorted by length (longest first) and cut into batches of ``batch_size``,
   so rows of a batch have similar lengths; results come back in the input order.
2. Each batch is LEFT-padded to its longest prompt. Every row gets the positions it
   would have alone (``0..len-1`` for its real tokens) and an attention mask that hides
   the padding columns, so a padded row computes what the prompt alone computes (up to
   float rounding of the differently shaped matmuls; the greedy tokens are tested equal).
3. One forward pass over the whole prompt fills the model's KV cache
   (:meth:`~lmkit.models.base.LanguageModel.new_kv_cache`; prefill); after that each step
   feeds one token per row. A model without ``new_kv_cache`` is run without a cache (the
   whole padded sequence each step, as ``use_cache=False``).
4. A row stops at ``eos_id``, at the end of any ``stop_sequences`` (token ids), when its
   decoded text contains any ``stop_strings`` (tokenizer-independent: ``"\n\n"`` may be one
   token or two), after ``max_new_tokens`` tokens, or when its context is full. Finished rows are dropped
   from the batch (and from the cache), so they cost nothing afterwards.

Context limit (``block_size``): the model never sees more than ``block_size`` tokens of a
row. A prompt longer than that is cut from the LEFT to its last ``block_size`` tokens, and
a row whose prompt has ``P`` tokens generates at most ``block_size - P + 1`` tokens
(the last one is predicted from a full window). Generation then STOPS (no sliding
window: a slid window would need a full recompute without the cache and changes what
the model conditions on). :func:`generate_ex` reports both events per prompt.

Decoding: greedy (argmax; ties go to the lowest id) when ``temperature == 0``; otherwise
``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits and sampled
with ``torch.multinomial`` from ``generator``. Sampling draws one number per active row
per step, so the samples depend on the batch composition (``batch_size`` and the
prompts); with the same inputs and seed they are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

#: Why a row stopped.
FINISH_REASONS = ("eos", "stop", "length", "context")


@dataclass
class Generation:
    """Result of :func:`generate_ex`, one entry per prompt in input order.

    Attributes:
        tokens: the generated ids, without the EOS token or the matched stop sequence.
        finish: ``"eos"``, ``"stop"`` (a stop sequence), ``"length"`` (``max_new_tokens``)
            or ``"context"`` (the row's context reached ``block_size``).
        prompt_truncated: the prompt was longer than ``block_size`` and was cut from the left.
    """

    tokens: list[list[int]]
    finish: list[str]
    prompt_truncated: list[bool] = field(default_factory=list)


def _block_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "block_size", None)
    if size is None:
        raise ValueError("generate needs a model with config.block_size (an lmkit model)")
    return int(size)


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """Next ids ``(B,)`` from last-position logits ``(B, V)``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).view(-1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def _cut_at_string(g: list[int], stop_strings: Sequence[str], decode: Callable[[list[int]], str],
                   window: int) -> bool:
    """If the text of ``g`` now contains a stop string, drop the trailing tokens that lie
    wholly inside it (tokens straddling its start stay) and return True."""
    if not any(s in decode(g[-window:]) for s in stop_strings):
        return False
    text = decode(g)
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    start = min(hits, default=len(text))
    while g and len(decode(g[:-1])) >= start:
        g.pop()
    return True


def _ends_with(seq: list[int], stops: Sequence[Sequence[int]]) -> int:
    """Length of the first stop sequence ``seq`` ends with (0 if none)."""
    for stop in stops:
        n = len(stop)
        if n and len(seq) >= n and seq[-n:] == list(stop):
            return n
    return 0


@torch.no_grad()
def generate_ex(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    use_cache: bool = True,
    stop_strings: Sequence[str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> Generation:
    """Continue each prompt; see the module docstring for batching and limits.

    Args:
        model: an lmkit GPT (any module with ``config.block_size`` whose forward accepts
            ``position_ids``, ``attn_mask``, ``kv_cache`` and ``last_only``), in eval mode.
            Runs on the device of its parameters.
        prompts: token ids per prompt; an empty prompt needs ``eos_id`` (it is started from
            ``[eos_id]``, the usual document separator).
        max_new_tokens: the most tokens generated per prompt (>= 1).
        eos_id: stop token (excluded from the output), or ``None``.
        stop_sequences: id sequences that end a row when generated (excluded from the output).
        temperature: 0 = greedy; > 0 scales the logits before sampling.
        top_k: sample only among the ``top_k`` most likely tokens.
        generator: random source for sampling (same seed, same inputs -> same outputs).
        batch_size: prompts per forward pass.
        progress: called as ``progress(done, total)`` each time a prompt finishes.
        stop_strings: end a row as soon as ``decode(its generated ids)`` contains one of
            these; the trailing tokens that lie wholly inside the stop string are dropped
            (a token straddling its start is kept: cut the decoded text at the string).
        decode: ids -> text, needed with ``stop_strings`` (e.g. ``tokenizer.decode``).
        use_cache: ``False`` recomputes the whole padded sequence every step (same masks and
            positions, no cache): the reference for tests and speed measurements. Models
            without ``new_kv_cache`` always run so.

    Returns:
        :class:`Generation` (ids, finish reasons, truncation flags) in input order.

    Raises:
        ValueError: bad arguments (``max_new_tokens < 1``, ``temperature < 0``,
            ``top_k < 1``, ``batch_size < 1``, an empty prompt without ``eos_id``,
            ``stop_strings`` without ``decode``).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    block_size = _block_size(model)
    device = next(model.parameters()).device
    new_cache = getattr(model, "new_kv_cache", None)
    use_cache = use_cache and callable(new_cache)
    stops = [list(s) for s in (stop_sequences or []) if len(s)]
    texts = [s for s in (stop_strings or []) if s]
    if texts and decode is None:
        raise ValueError("stop_strings need decode (ids -> text)")
    window = 4 * max((len(s) for s in texts), default=0) + 8
    total = len(prompts)

    cut: list[list[int]] = []
    truncated: list[bool] = []
    for p in prompts:
        ids = list(p)
        if not ids:
            if eos_id is None:
                raise ValueError("an empty prompt needs eos_id to start from")
            ids = [eos_id]
        truncated.append(len(ids) > block_size)
        cut.append(ids[-block_size:])

    out_tokens: list[list[int]] = [[] for _ in range(total)]
    out_finish: list[str] = [""] * total
    done = 0
    order = sorted(range(total), key=lambda i: -len(cut[i]))
    for start in range(0, total, batch_size):
        rows = order[start : start + batch_size]
        lengths = [len(cut[i]) for i in rows]
        width = max(lengths)
        budgets = [min(max_new_tokens, block_size - n + 1) for n in lengths]
        steps = max(budgets)
        B = len(rows)
        n_cols = width + steps - 1  # columns ever fed: the prompt, then all but the last token

        seq = torch.zeros(B, width + steps, dtype=torch.long, device=device)
        pad = torch.tensor([width - n for n in lengths], device=device)
        for r, i in enumerate(rows):
            seq[r, width - lengths[r] : width] = torch.tensor(cut[i], dtype=torch.long)
        col = torch.arange(width + steps, device=device)
        key_valid = col[None, :] >= pad[:, None]  # (B, C): False on padding columns
        positions = (col[None, :] - pad[:, None]).clamp(min=0)  # (B, C)
        # query i may see key j <= i that is not padding; a padding query sees itself only
        causal = col[:width, None] >= col[None, :width]
        eye = torch.eye(width, dtype=torch.bool, device=device)

        active = list(range(B))  # batch rows still running (indices into rows)
        alive = torch.arange(B, device=device)
        generated: list[list[int]] = [[] for _ in range(B)]
        cache = new_cache(B, n_cols) if use_cache else None

        for step in range(steps):
            cur = width + step  # columns filled so far
            if use_cache and step == 0:
                mask = causal[None] & (key_valid[alive, None, :width] | eye[None])
                logits, _ = model(seq[alive, :width], position_ids=positions[alive, :width],
                                  attn_mask=mask[:, None], kv_cache=cache, last_only=True)
            elif use_cache:
                mask = key_valid[alive, None, None, :cur]
                logits, _ = model(seq[alive, cur - 1 : cur], position_ids=positions[alive, cur - 1 : cur],
                                  attn_mask=mask, kv_cache=cache, last_only=True)
            else:
                # columns left of every running row's prompt are padding for all: drop them,
                # so the model sees at most block_size columns
                lo = int(pad[alive].min())
                span = col[lo:cur]
                full_causal = span[:, None] >= span[None, :]
                full_eye = torch.eye(cur - lo, dtype=torch.bool, device=device)
                mask = full_causal[None] & (key_valid[alive, None, lo:cur] | full_eye[None])
                logits, _ = model(seq[alive, lo:cur], position_ids=positions[alive, lo:cur],
                                  attn_mask=mask[:, None], last_only=True)
            nxt = _pick(logits[:, -1, :], temperature, top_k, generator)
            seq[alive, cur] = nxt
            keep: list[int] = []
            for k, (r, tok) in enumerate(zip(active, nxt.tolist(), strict=True)):
                g = generated[r]
                g.append(tok)
                reason = ""
                if eos_id is not None and tok == eos_id:
                    g.pop()
                    reason = "eos"
                elif stops and (n := _ends_with(g, stops)):
                    del g[-n:]
                    reason = "stop"
                elif texts and _cut_at_string(g, texts, decode, window):
                    reason = "stop"
                elif len(g) >= budgets[r]:
                    reason = "length" if budgets[r] == max_new_tokens else "context"
                if reason:
                    i = rows[r]
                    out_tokens[i], out_finish[i] = g, reason
                    done += 1
                    if progress is not None:
                        progress(done, total)
                else:
                    keep.append(k)
            if not keep:
                break
            if len(keep) < len(active):
                keep_t = torch.tensor(keep, device=device)
                alive = alive[keep_t]
                active = [active[k] for k in keep]
                if cache is not None:
                    cache.select(keep_t)
    return Generation(tokens=out_tokens, finish=out_finish, prompt_truncated=truncated)


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    stop_strings: Sequence[str] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> list[list[int]]:
    """Each prompt's continuation ids (stop token / stop sequence excluded), in input order.

    The same as :func:`generate_ex` (which also says why each row stopped and which
    prompts were cut), returning only the ids. Raises ``ValueError`` on bad arguments.
    """
    return generate_ex(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id,
                       stop_sequences=stop_sequences, temperature=temperature, top_k=top_k,
                       generator=generator, batch_size=batch_size, progress=progress,
                       stop_strings=stop_strings, decode=decode).tokens
