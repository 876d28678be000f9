"""The training engine: the loop and what it runs on.

* :mod:`jdet.engine.training`: ``train_and_evaluate`` (``train.py``), the jitted step;
* :mod:`jdet.engine.train_state`, :mod:`jdet.engine.optim`: the state and the optimiser;
* :mod:`jdet.engine.checkpoint`: checksummed orbax checkpoints, restoring for evaluation;
* :mod:`jdet.engine.signals`: a stop at a step boundary on SIGTERM / SIGINT;
* :mod:`jdet.engine.workdir`: one run per run directory (a lock), the saved config;
* :mod:`jdet.engine.metrics`: the metrics log, TensorBoard events, the progress bar;
* :mod:`jdet.engine.logs`: what the programs log, and at which verbosity;
* :mod:`jdet.engine.hostmem`: the host allocator (set up before jax is imported).

This package's ``__init__`` imports nothing, so that ``jdet/__init__.py`` can run
:mod:`jdet.engine.hostmem` before jax.
"""
