"""Measuring a model: evaluation, perplexity, speed, comparison, plots."""
