"""Training: device and precision policy, LR schedules, optimizer, checkpoints, the loop."""
