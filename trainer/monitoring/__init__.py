"""What a run records for watching it, never what it trains: metric logs and TensorBoard summaries, step timing,
gradient norms, the projector, validation-time health, each run's curves.png and results.md."""
