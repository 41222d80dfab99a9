"""Training: LightningModule, MegatronStrategy, optimizer and schedules, checkpoints, callbacks."""
