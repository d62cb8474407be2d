"""Guarantees that cross stages: bad and hostile inputs, security, signals, permissions, model families, GPUs."""
