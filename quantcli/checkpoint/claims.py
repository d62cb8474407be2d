"""``inspect`` prints a quantcli.json only if its claims agree with the checkpoint (issue 25, class 9).

``eval`` and ``quantcli.load`` check the claims against the loaded model
(:func:`quantcli.checkpoint.metadata.check_claims`);
``inspect`` loads no weights, so it checks them against the model's skeleton: the architecture built
from config.json on the meta device (no memory, no weights read), and config.json's quantization
section. A checkpoint that ships its own code is not built without --trust-remote-code: ``eval`` checks
it when it loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli.checkpoint.metadata import check_claims
from quantcli.errors import CheckpointError
from quantcli.sources.models import skeleton
from quantcli.sources.remote import ships_code


def check_claims_on_skeleton(folder: Path, metadata: dict[str, Any]) -> None:
    """:func:`quantcli.checkpoint.metadata.check_claims` with the model built on the meta device from config.json."""
    import torch

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return  # a GGUF checkpoint: the file is its own config, checked when it is read
    if ships_code(folder):
        return  # its model is not built without --trust-remote-code; eval checks it when it loads
    try:
        model = skeleton(str(folder), torch.float32, False)
    except (OSError, ValueError, KeyError, TypeError) as error:
        why = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
        raise CheckpointError(
            f"cannot build the model {folder}/config.json describes ({why}). Re-run quantcli quantize."
        ) from None
    check_claims(folder, metadata, model)
