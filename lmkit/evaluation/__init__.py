"""Evaluation: losses, and task metrics computed by generation.

:mod:`lmkit.evaluation.lm` -- mean cross-entropy (nats/token) and perplexity.
:mod:`lmkit.evaluation.arithmetic` -- seed 000's exact-match accuracy by greedy
generation, split into flat and parenthesised expressions.
"""
