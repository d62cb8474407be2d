"""quantcli's benchmark suites (see benchmarks/README.md). Run from the repository root as modules,
``python -m benchmarks.NAME``, so ``benchmarks.lib`` and ``tests.support`` import without path setup."""
