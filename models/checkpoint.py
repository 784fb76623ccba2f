"""Loading checkpoints strictly, with errors a user can act on.

Every adapter in `models/` ends here: a state_dict is mapped onto one of our modules and loaded with
`strict=True`, so a wrong or partial checkpoint fails with the keys that are missing or unexpected instead of
silently leaving layers at their random initialisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """The checkpoint cannot be read, or does not fit the model it was meant for."""


def read_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state_dict from a `.pth`/`.pt`/`.ckpt` file, optionally nested under `key`.

    Strips a DataParallel `module.` prefix. Raises CheckpointError for unreadable or non-dict files.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as exc:  # torch raises many types for corrupt files (pickle, zip, runtime)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise CheckpointError(f"{path}: expected a dict with key {key!r}")
        obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `state_dict` into `module`, failing with the missing/unexpected/mis-shaped keys named."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mis_shaped:
        parts = [f"{source} does not fit {type(module).__name__}:"]
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError("\n  ".join(parts))
    module.load_state_dict(state_dict, strict=True)
