"""Training stage: losses, optimiser groups, schedules, the fold trainer and cross-validation."""
