"""params `heads` (stage train_heads): head types, hyperparameter selection on val, models/heads files."""
