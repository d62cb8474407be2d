"""llama.cpp's GGUF: block types (legacy and K-quants, each registering itself), metadata, the writer."""
