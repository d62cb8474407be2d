"""The quantize run: the pipeline, streaming, and the report."""
