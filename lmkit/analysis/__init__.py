"""Analysis of models without training them: the memory estimator (``memory``, with the
per-family terms of ``memory_family`` / ``memory_backpack``, checked by ``memory_measure``;
``memory_terms`` measures every term of a CUDA step for the calibration),
the environment report (``environment``) and the SVD metrics of ``lmkit svd-analyze``
(``spectral``, ``svd_analyze``, ``svd_log``, ``svd_plots``)."""
