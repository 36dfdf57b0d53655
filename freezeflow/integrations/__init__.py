"""Adapters over the core: MLflow tracking and the model registry, Optuna sweeps, DVC, reports and plots,
the team servers. They may import the core, never the app (enforced by import-linter)."""
