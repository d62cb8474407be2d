"""Shared test helpers: hostile files, GGUF fixtures, paths."""
