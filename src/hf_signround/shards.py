"""Write a checkpoint's tensors into safetensors shards as they come, never holding it whole.

Files follow transformers' naming: one ``model.safetensors``, or ``model-0000i-of-0000N.safetensors``
plus ``model.safetensors.index.json`` when there is more than one shard. Shards are written
under temporary names and renamed when the count is known.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

__all__ = ["ShardWriter", "size_in_bytes"]

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def size_in_bytes(size: int | str) -> int:
    """``5_000_000``, ``"500MB"`` or ``"5GB"`` (decimal units, as transformers) in bytes."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: give bytes as an int or a string such as '500MB' or '5GB'")
    return int(float(match[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match[2]])


class ShardWriter:
    """``add`` tensors in order; a shard is written once it would pass ``max_shard_size``; ``close`` names them.

    Stale weight files of an earlier save in the folder are removed first: a leftover shard
    would otherwise be read alongside the new ones.
    """

    def __init__(self, folder: str | Path, max_shard_size: int | str = "5GB"):
        self.folder = Path(folder)
        self.limit = size_in_bytes(max_shard_size)
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in [*self.folder.glob("model*.safetensors"), self.folder / INDEX]:
            old.unlink(missing_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.limit:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if self.pending:
            name = f".shard-{len(self.written):05d}.tmp"
            save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
            self.written.append((name, list(self.pending)))
            self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is left, give the shards their final names; returns the files written."""
        self.flush()
        if len(self.written) == 1:
            (self.folder / self.written[0][0]).rename(self.folder / WEIGHTS)
            return [WEIGHTS]
        files, weight_map = [], {}
        for i, (tmp, keys) in enumerate(self.written, 1):
            final = f"model-{i:05d}-of-{len(self.written):05d}.safetensors"
            (self.folder / tmp).rename(self.folder / final)
            weight_map.update(dict.fromkeys(keys, final))
            files.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [*files, INDEX]
