"""Training: the jitted steps, the starting state, the training run and metrics."""
