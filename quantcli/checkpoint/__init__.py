"""A quantcli checkpoint: quantcli.json, loading any checkpoint, atomic output."""
