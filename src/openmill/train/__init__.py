"""Training: the engine, checkpointing, schedules, parallelism, metrics."""
