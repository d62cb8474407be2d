"""``quantcli methods``: each quantization method and whether it can run here."""

from __future__ import annotations

from quantcli.cli.flags import cli_text
from quantcli.methods import available_methods


def methods() -> None:
    """List the quantization methods and whether each can run here."""

    for cls in available_methods():
        reason = cls().unavailable_reason("cpu")
        reason = reason and cli_text(reason)
        bits = "/".join(map(str, cls.supported_bits))
        status = f"  (CPU: {reason})" if reason else ""
        print(f"{cls.name:10} {bits:7} {cls.summary}{status}")
