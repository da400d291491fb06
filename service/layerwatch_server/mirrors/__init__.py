"""Mirrors: copies of what the collector stores, shaped for other tools (MLflow)."""
