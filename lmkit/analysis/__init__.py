"""Analysis of models without training them: the memory estimator (later: SVD metrics)."""
