"""Atomic output and reading quantcli checkpoints back."""
