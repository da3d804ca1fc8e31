"""Data-parallel training with Horovod: process set-up, gradient grouping, scaling model."""
