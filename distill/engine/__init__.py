"""Training engine: optimizer and schedule, evaluation, checkpoints, the Trainer."""
