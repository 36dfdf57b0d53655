"""Prefect tasks: thin adapters over freezeflow.app.steps (the same functions the CLI and DVC call)."""
