"""Training: the step loop, its runner (set-up, validation, checkpoints, resume), optimizer and
schedule, sampling, fault handling, run records, and the ablation driver."""
