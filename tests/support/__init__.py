"""Support shared by tests and benchmarks: where the real models and texts are (``models``), hostile files
(``badfiles``), GGUF fixtures (``gguf_files``) and llama.cpp as a measuring instrument (``gguf_harness``).
Imported as ``tests.support`` (tests and benchmarks both run from the repository root)."""
