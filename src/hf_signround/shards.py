"""Write a checkpoint's tensors into safetensors shards as they come, holding none of them.

Each tensor's bytes go to disk the moment it is added (a temporary data file per shard);
when a shard is full, its file is assembled as safetensors' layout (an 8-byte header
length, the JSON header with every tensor's dtype, shape and byte range, then the data)
by copying the data file behind the header. So writing a checkpoint costs no memory beyond
the tensor being added, whatever ``max_shard_size`` is.

Files follow transformers' naming: one ``model.safetensors``, or ``model-0000i-of-0000N.safetensors``
plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["ShardWriter", "size_in_bytes"]

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def size_in_bytes(size: int | str) -> int:
    """``5_000_000``, ``"500MB"`` or ``"5GB"`` (decimal units, as transformers) in bytes."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: give bytes as an int or a string such as '500MB' or '5GB'")
    return int(float(match[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match[2]])


class ShardWriter:
    """``add`` tensors in order; a new shard starts when the next tensor would pass ``max_shard_size``;
    ``close`` gives the shards their final names and writes the index.

    Stale weight files of an earlier save in the folder are removed first: a leftover shard
    would otherwise be read alongside the new ones.
    """

    def __init__(self, folder: str | Path, max_shard_size: int | str = "5GB"):
        self.folder = Path(folder)
        self.limit = size_in_bytes(max_shard_size)
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in [*self.folder.glob("model*.safetensors"), self.folder / INDEX]:
            old.unlink(missing_ok=True)
        self.written: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self._header: dict[str, dict] = {}
        self._data = None  # the open data file of the shard being filled
        self._size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: safetensors cannot store {t.dtype}")
        size = t.numel() * t.element_size()
        if self._header and self._size + size > self.limit:
            self.flush()
        if self._data is None:
            self._data = open(self.folder / f".shard-{len(self.written):05d}.data.tmp", "wb")  # noqa: SIM115
        self._data.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._size, self._size + size]}
        self._size += size
        self.total_bytes += size

    def flush(self) -> None:
        """Finish the shard being filled: header, then its data."""
        if self._data is None:
            return
        self._data.close()
        data = Path(self._data.name)
        name = f".shard-{len(self.written):05d}.tmp"
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        with open(self.folder / name, "wb") as out, open(data, "rb") as src:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(src, out, 16 * 2**20)
        data.unlink()
        self.written.append((name, list(self._header)))
        self._header, self._data, self._size = {}, None, 0

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
