"""Prefect tasks: thin adapters over freezeflow.pipeline (the same functions the CLI and DVC call)."""
