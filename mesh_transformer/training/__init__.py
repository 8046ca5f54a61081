"""Training: the jitted steps, the training run, checkpoints and metrics."""
