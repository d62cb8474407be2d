"""Each output format, reloaded by its own runtime (transformers, llama.cpp)."""
