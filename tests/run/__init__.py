"""The quantize pipeline, in memory and streamed."""
