"""An lmkit run as an lm-evaluation-harness model (``lm_eval.api.model.LM``).

:class:`LmkitLM` answers the harness's three request types with lmkit's own code, on the
run's own tokenizer, with no export:

* ``loglikelihood(context, continuation)`` -> ``(log p, is_greedy)``: the pair is encoded
  as the harness's causal models do (``TemplateLM._encode_pair``: trailing spaces of the
  context move to the continuation; ``encode(context + continuation)`` is split after
  ``len(encode(context))`` ids); an empty context is conditioned on the EOS token.
  Requests with the same context ids are scored together with
  :func:`lmkit.evaluation.lm.choice_logprobs` (the context computed once); a context too
  long for ``block_size`` goes through :func:`lmkit.evaluation.lm.continuation_logprobs`,
  which keeps the last ``block_size + 1`` ids as the harness's ``HFLM`` does.
* ``loglikelihood_rolling(text)`` -> ``log p(text)``: the harness's disjoint rolling
  windows (``lm_eval.utils.get_rolling_token_windows`` with the EOS token as prefix and
  ``block_size`` as the maximum length and ``context_len=1``: the text is cut into
  disjoint windows, every token predicted once, the last window given a full context),
  each window scored by ``continuation_logprobs``.
* ``generate_until(context, gen_kwargs)`` -> text: lmkit's batched KV-cache decoder
  (:func:`lmkit.evaluation.generate.generate_ex`), greedy unless ``do_sample``; stops at
  EOS, at any ``until`` string (the text is cut before it, as the harness's
  ``postprocess_generated_text`` does) or after ``max_gen_toks`` (default 256); the prompt
  is cut from the left to ``block_size - max_gen_toks`` ids (``HFLM``'s rule).

All log-likelihoods are natural-log sums (nats) in fp32 log-softmax, as
:mod:`lmkit.evaluation.lm` computes them. Importing this module imports ``lm_eval``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lm_eval.api.model import LM
from torch import nn

from lmkit.errors import DataError

#: The harness's default generation length (``HFLM.max_gen_toks``).
DEFAULT_MAX_GEN_TOKS = 256


class LmkitLM(LM):
    """lm-evaluation-harness model backed by an lmkit model and tokenizer.

    Args:
        model: an lmkit language model (eval mode) on ``device``.
        tokenizer: the run's tokenizer (``encode``/``decode``, ``eos_id`` may be ``None``:
            then an empty context and rolling log-likelihoods are refused).
        block_size: the model's context length (tokens).
        device: where the model lives.
        batch_size: prompts per generation batch.
        max_tokens: token budget per scoring forward pass.
        seed: seed of the sampling generator (used only when a task asks ``do_sample``).
        progress: ``progress(done, total)`` after each batch of requests.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, block_size: int, device: torch.device,
                 batch_size: int = 32, max_tokens: int = 16384, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.block_size = int(block_size)
        self._device = device
        self.batch_size = max(1, int(batch_size))
        self.max_tokens = int(max_tokens)
        self.seed = int(seed)
        self.progress = progress or (lambda done, total: None)

    # ------------------------------------------------------------------ encoding

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def _eos(self, what: str) -> int:
        eos = getattr(self.tokenizer, "eos_id", None)
        if eos is None:
            raise DataError(f"lm-eval: {what} needs an EOS token to condition on, and the run's tokenizer has none")
        return int(eos)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context ids, continuation ids)`` as the harness's causal models split them."""
        if context == "":
            cont = self._encode(continuation)
            eos = self._eos("an empty context")
            if cont and cont[0] == eos:
                return cont[:1], cont[1:]
            return [eos], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------------ requests

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log p(continuation | context) in nats, continuation is the greedy choice)`` per request.

        Raises:
            DataError: a continuation longer than ``block_size`` ids, or an empty one.
        """
        pairs = [self.encode_pair(*req.args) for req in requests]
        return self._score_pairs(pairs, "loglikelihood")

    def _score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]], what: str) -> list[tuple[float, bool]]:
        from lmkit.evaluation.lm import choice_logprobs, continuation_logprobs

        for _, cont in pairs:
            if not cont:
                raise DataError(f"lm-eval {what}: an empty continuation (nothing to score)")
            if len(cont) > self.block_size:
                raise DataError(f"lm-eval {what}: a continuation of {len(cont)} tokens exceeds the model's "
                                f"block_size {self.block_size}")
        total = len(pairs)
        out: list[tuple[float, bool] | None] = [None] * total
        groups: dict[tuple[int, ...], list[int]] = {}
        long_rows: list[int] = []
        for i, (ctx, cont) in enumerate(pairs):
            if len(ctx) + len(cont) <= self.block_size:
                groups.setdefault(tuple(ctx), []).append(i)
            else:
                long_rows.append(i)
        done = 0
        self.progress(0, total)
        keys = list(groups)
        step = max(1, self.batch_size)
        for start in range(0, len(keys), step):
            chunk = keys[start:start + step]
            scores = choice_logprobs(self.model, [(list(k), [pairs[i][1] for i in groups[k]]) for k in chunk],
                                     block_size=self.block_size, device=self._device, max_tokens=self.max_tokens)
            for key, group_scores in zip(chunk, scores, strict=True):
                for i, s in zip(groups[key], group_scores, strict=True):
                    out[i] = (s.logprob, s.greedy)
                    done += 1
            self.progress(done, total)
        if long_rows:
            scores = continuation_logprobs(self.model, [pairs[i] for i in long_rows], block_size=self.block_size,
                                           device=self._device, max_tokens=self.max_tokens)
            for i, s in zip(long_rows, scores, strict=True):
                out[i] = (s.logprob, s.greedy)
            self.progress(total, total)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """``log p(text)`` in nats per request (every token predicted once; see the module docstring)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for r, req in enumerate(requests):
            (text,) = req.args[:1]
            ids = self._encode(text)
            if not ids:
                continue
            eos = self._eos("loglikelihood_rolling")
            for window in get_rolling_token_windows(token_list=ids, prefix_token=eos, max_seq_len=self.block_size,
                                                    context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(r)
        scores = self._score_pairs(windows, "loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, scores, strict=True):
            totals[r] += logprob
        return totals

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """The generated text per request (see the module docstring).

        Raises:
            DataError: ``max_gen_toks`` leaves no room for a prompt in ``block_size``.
        """
        from lmkit.evaluation.generate import generate_ex

        total = len(requests)
        out: list[str | None] = [None] * total
        by_kwargs: dict[str, list[int]] = {}
        args = [req.args for req in requests]
        for i, (_, gen_kwargs) in enumerate(args):
            by_kwargs.setdefault(repr(sorted((gen_kwargs or {}).items())), []).append(i)
        done = 0
        self.progress(0, total)
        for indices in by_kwargs.values():
            kwargs = _normalize(dict(args[indices[0]][1] or {}))
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else [u for u in until if u]
            max_gen = int(kwargs.pop("max_gen_toks"))
            room = self.block_size - max_gen
            if room < 1:
                raise DataError(f"lm-eval generate_until: max_gen_toks {max_gen} leaves no room for a prompt in "
                                f"block_size {self.block_size}; pass a smaller --max-new-tokens")
            temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
            top_k = kwargs.get("top_k")
            generator = None
            if temperature > 0:
                generator = torch.Generator(device=self._device).manual_seed(self.seed)
            prompts = [self._encode(args[i][0])[-room:] for i in indices]
            gen = generate_ex(self.model, prompts, max_new_tokens=max_gen, eos_id=getattr(self.tokenizer, "eos_id", None),
                              temperature=temperature, top_k=int(top_k) if top_k else None, generator=generator,
                              batch_size=self.batch_size, stop_strings=until or None,
                              decode=self.tokenizer.decode if until else None)
            for i, tokens in zip(indices, gen.tokens, strict=True):
                text = self.tokenizer.decode(tokens)
                for term in until:  # the harness's postprocess_generated_text: cut at each stop string
                    text = text.split(term)[0]
                out[i] = text
            done += len(indices)
            self.progress(done, total)
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ harness bookkeeping

    @property
    def tokenizer_name(self) -> str:
        fingerprint = getattr(self.tokenizer, "fingerprint", None)
        return f"lmkit-{fingerprint()}" if callable(fingerprint) else "lmkit"


def _normalize(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The harness's generation kwargs with ``max_gen_toks`` resolved (aliases ``max_new_tokens``,
    ``max_tokens``, ``max_completion_tokens``; default :data:`DEFAULT_MAX_GEN_TOKS`) and
    ``temperature`` 0 unless ``do_sample`` (``lm_eval.models.utils.normalize_gen_kwargs`` where
    the installed harness has it, this rule otherwise)."""
    try:
        from lm_eval.models.utils import normalize_gen_kwargs
    except ImportError:  # harness versions before it existed
        out = dict(gen_kwargs)
        sizes = [out.pop(k, None) for k in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")]
        out["max_gen_toks"] = int(next((v for v in sizes if v is not None), DEFAULT_MAX_GEN_TOKS))
        temperature = float(out.get("temperature") or 0.0)
        out.setdefault("do_sample", temperature > 0)
        if not out["do_sample"]:
            out["temperature"] = 0.0
        return out
    return dict(normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS))
