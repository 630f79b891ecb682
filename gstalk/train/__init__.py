"""The trainer: stages, losses, densification, checkpoints and resume."""
