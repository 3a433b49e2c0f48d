"""Training: ``refinedet train`` (``model.training.cli``) and the ``Trainer`` behind it.

Kept import-free so that the CLI's ``register`` does not import torch; use
``from model.training.trainer import Trainer, train`` and ``from model.training.options import TrainOptions``.
"""
