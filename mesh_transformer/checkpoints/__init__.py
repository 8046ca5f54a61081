"""Checkpoints on storage, below training, inference and conversion (which all import it).

The store (``store``: Orbax I/O, atomicity, retention) with its checksums (``integrity``); what a
training checkpoint holds and the upgrade of older layouts (``format``); finding one (``locate``: native,
a LoRA run's base, the original's v1 layout), reading v1 checkpoints (``legacy``), and parameters for
inference and step 0 of converted weights (``params``).
"""
