"""Metrics: pure functions over scores."""
