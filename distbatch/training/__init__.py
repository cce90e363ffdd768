"""The training loop: batch plan, the shared step and the gradient noise scale it feeds, the Trainer and what it drives (checkpoints, early stopping, preemption, batch-size schedules, goodput)."""
