"""The Lightning layer: module, callbacks and the ``train(cfg)`` entry that run.py calls."""
