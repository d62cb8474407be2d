"""Models, tokenizers, datasets and token streams as quantcli reads them."""
