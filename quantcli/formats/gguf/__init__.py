"""llama.cpp's GGUF: block types (legacy and K-quants, each registering itself), metadata, the writer."""

from quantcli.formats.gguf.writer import GGUF  # registers the format

__all__ = ["GGUF"]
