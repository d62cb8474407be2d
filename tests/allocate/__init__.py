"""Per-layer precision search."""
