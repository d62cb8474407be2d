"""quantcli: quantize Hugging Face causal LMs to INT8/INT4 and measure what it cost.

The public API is lazy so that ``import quantcli`` stays fast and pulls in neither torch nor
transformers: ``quantize``, ``evaluate``, ``load``, ``inspect`` and the config classes load their
modules on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
SCHEMA_VERSION = 1  # of every JSON result: quantize report, eval, compare, bench

_EXPORTS = {
    "quantize": "quantcli.run.pipeline",
    "evaluate": "quantcli.measure.evaluation",
    "load": "quantcli.checkpoint.load",
    "inspect": "quantcli.checkpoint.load",
    "QuantizeConfig": "quantcli.config.quantize",
    "CalibrationConfig": "quantcli.config.quantize",
    "EvalConfig": "quantcli.config.quantize",
    "QuantCliError": "quantcli.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'quantcli' has no attribute {name!r}")
