"""Training with TempBalance: models, data sets, the loop, checkpoints and baselines."""
