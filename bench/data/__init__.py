"""Benchmark data: typed records, loaders that look in a data directory first, and folds."""
