"""Training: a pure sharded train step, the loop around it, optimizers, checkpoints, metrics."""
