"""The training loop: batch plan, input pipeline, the shared step, the Trainer and what it drives (checkpoints, early stopping, preemption, batch-size schedules, goodput)."""
