"""Inference: text decoding, token choice, the KV-cache generator, batching and scoring."""
