"""Inference: requests and their text (text), token choice (sampler), the KV-cache generator (engine),
continuous batching (batching), static shapes (shapes), prompt scoring (scoring). Weights come from
``checkpoints.params``."""
