"""Where a run's inputs come from: models, tokenizers, datasets, token streams, load-time checks."""
