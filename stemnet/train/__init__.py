"""Training: losses, schedules, optimizers, checkpoints, and the loop itself."""
