"""Evaluation: losses, multiple-choice log-likelihoods, generation, and the tasks of ``lmkit eval``.

Building blocks:

:mod:`lmkit.evaluation.lm` -- mean cross-entropy (nats/token), perplexity, and the
log-likelihood of continuations given a context (``continuation_logprobs``; several
continuations of one context share it in ``choice_logprobs``).
:mod:`lmkit.evaluation.generate` -- batched, left-padded generation with a KV cache.
:mod:`lmkit.evaluation.task` -- the task contract (``EvalContext`` -> ``TaskResult``), the
registry and the layout of ``runs/NAME/eval/``.
:mod:`lmkit.evaluation.curves` -- the PNG of a checkpoint sweep.

Tasks (``lmkit eval RUN --task NAME``):

``perplexity`` (:mod:`~lmkit.evaluation.perplexity`) -- mean loss, perplexity and bits per
byte (nanochat's definition) on the run's val split or a text file.
``arithmetic`` (:mod:`~lmkit.evaluation.arithmetic`) -- the arithmetic experiment: exact match of the
generated answer on val / test_flat / test_paren and the paren - flat gap; teacher-forced
all-answer-characters accuracy; ``--legacy-eos-metric`` for the seed's own (EOS) number.
``hellaswag`` (:mod:`~lmkit.evaluation.hellaswag`) -- acc, acc_norm (per token,
build-nanogpt) and acc_norm_chars (per character, lm-evaluation-harness).
``gsm8k``, ``arithmetic-probes``, ``sample`` -- generation tasks (the multiplication-tokens study).
"""
