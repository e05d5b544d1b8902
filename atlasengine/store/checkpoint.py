"""Model checkpoints in safetensors: weights, accumulated Fisher and anchor weights.

No pickle is involved anywhere: safetensors holds raw tensors and a string header.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from atlasengine.errors import AtlasIntegrityError, AtlasWriteError

_GROUPS = ("weights", "fisher", "anchor")
FORMAT = "atlasengine-checkpoint-2"
"""2: the header says what the Fisher represents (``fisher_kind``, ``fisher_cells``, ``fisher_version``)."""


def save_checkpoint(
    path: Path,
    weights: dict[str, torch.Tensor],
    fisher: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the three tensor groups to one safetensors file (keys ``group/name``), ``metadata`` in its header."""
    tensors: dict[str, torch.Tensor] = {}
    for group, d in zip(_GROUPS, (weights, fisher, anchor)):
        for name, t in d.items():
            tensors[f"{group}/{name}"] = t.detach().cpu().clone().contiguous()
    try:
        save_file(tensors, str(path), metadata={**(metadata or {}), "format": FORMAT})
    except (SafetensorError, OSError) as exc:  # disk full, quota, permissions
        raise AtlasWriteError(f"cannot write checkpoint {path}: {exc}") from exc


def load_checkpoint(
    path: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """Read ``(weights, fisher, anchor, header metadata)`` back."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AtlasIntegrityError(f"checkpoint {path} cannot be read: {exc}") from exc
    out: dict[str, dict[str, torch.Tensor]] = {g: {} for g in _GROUPS}
    for key, t in tensors.items():
        group, _, name = key.partition("/")
        if group in out:
            out[group][name] = t
    return out["weights"], out["fisher"], out["anchor"], metadata
