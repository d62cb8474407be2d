"""Support shared by tests and benchmarks: where the real models and texts are (``models``) and llama.cpp as a
measuring instrument (``gguf_harness``). Tests import it as ``support`` (pytest puts ``tests/`` on the path);
benchmarks, run from the repository root as ``python -m benchmarks.NAME``, as ``tests.support``."""
