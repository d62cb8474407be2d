"""Perplexity, speed and comparisons, against independent tools."""
