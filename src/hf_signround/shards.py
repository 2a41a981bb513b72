"""Safetensors files: read a header (validated), and write shards as tensors come, holding none of them.

Layout: an 8-byte little-endian header length n, n bytes of JSON (per tensor its dtype,
shape and ``data_offsets`` relative to the data section, plus an optional ``__metadata__``
dict of strings), then the data section, which the tensors cover exactly, back to back.

``read_header`` reads the header only and checks it against the file's size, so a file cut
short or with a damaged header fails with its path before any tensor is read.
``SafetensorsFolder`` reads a checkpoint folder's tensors a few at a time, by name.

``ShardWriter``: each tensor's bytes go to disk the moment it is added (a temporary data file
per shard); ``close`` assembles each shard's file (header, then the data file copied behind
it). So writing a checkpoint costs no memory beyond the tensor being added, whatever
``max_shard_size`` is. Files follow transformers' naming: one ``model.safetensors``, or
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "Header", "SafetensorsFolder", "ShardWriter", "TensorInfo", "format_size", "read_header",
           "size_in_bytes"]

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not match its model; the message names the file and the fix."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header; ``start``/``end`` are absolute byte offsets in the file."""

    dtype: str  # safetensors' name: "F16", "I32", ...
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str | Path) -> Header:
    """The validated header of a safetensors file; the tensor data is not read.

    Raises ``CheckpointError`` naming the file when the header is not valid JSON of the
    layout, or when the tensors do not cover the data section exactly (a file cut short
    or with bytes appended, a damaged length or offset).
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = int.from_bytes(f.read(8), "little") if size >= 8 else None
        if length is None or length > size - 8:
            _broken(path, f"the file has {size} bytes, fewer than its header length field says"
                    if length is not None else f"the file has {size} bytes, fewer than the 8-byte header length")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except ValueError as err:  # JSON or UTF-8 errors
        _broken(path, f"its header is not valid JSON ({err})")
    if not isinstance(header, dict):
        _broken(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        _broken(path, "its __metadata__ is not a dict of strings")
    data_start = 8 + length
    tensors = {name: _tensor_info(path, name, entry, data_start) for name, entry in header.items()}
    covered = data_start
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start != covered:  # safetensors writes the tensors back to back
            _broken(path, f"tensor {name} starts at byte {info.start}, expected {covered}")
        covered = info.end
    if covered != size:
        _broken(path, f"its tensors end at byte {covered} but the file has {size} bytes"
                + (" (it was cut short)" if covered > size else ""))
    return Header(tensors, metadata)


def _tensor_info(path: Path, name: str, entry, data_start: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        _broken(path, f"the entry of tensor {name} is not {{dtype, shape, data_offsets}}")
    if dtype not in TORCH_DTYPES:
        _broken(path, f"tensor {name} has unknown dtype {dtype!r}")
    ints = [*shape, begin, end] if isinstance(shape, list) else None
    if ints is None or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ints):
        _broken(path, f"tensor {name} has an invalid shape {shape!r} or data_offsets {[begin, end]!r}")
    count = 1
    for dim in shape:
        count *= dim
    if end - begin != count * TORCH_DTYPES[dtype].itemsize:
        _broken(path, f"tensor {name} ({dtype}, shape {shape}) does not fit its {end - begin}-byte range")
    return TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end)


def _broken(path: Path, reason: str) -> NoReturn:
    raise CheckpointError(
        f"{path} is not a valid safetensors file: {reason}. The file is damaged or incomplete (e.g. an interrupted "
        "download or save): re-download or re-save the checkpoint"
    )


class SafetensorsFolder:
    """The safetensors of a checkpoint folder (one file, or shards with an index), read by tensor name.

    Every file's header is read and checked on opening, so a damaged file fails before any
    work. Tensors are read straight into fresh memory, not through a memory map: the pages a
    map touches stay resident (and counted) while any tensor of the file lives, and a copy out
    of it needs the memory twice.
    """

    def __init__(self, folder: str | Path):
        self.folder = folder = Path(folder)
        index = folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                stored = {key: folder / name for key, name in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{index} is not a valid shard index ({err!r}): re-download or re-save the "
                                      "checkpoint") from err
        elif (folder / WEIGHTS).is_file():
            stored = None
        else:
            raise FileNotFoundError(f"{folder} holds no {WEIGHTS} or {INDEX}: give a folder saved by "
                                    "save_pretrained in the safetensors format (re-save a .bin checkpoint first)")
        paths = sorted(set(stored.values())) if stored is not None else [folder / WEIGHTS]
        self.headers = {path: read_header(path).tensors for path in paths}
        if stored is None:
            stored = dict.fromkeys(self.headers[folder / WEIGHTS], folder / WEIGHTS)
        for key, path in stored.items():
            if key not in self.headers[path]:
                raise CheckpointError(f"{index} lists {key} in {path.name}, which does not hold it: re-download or "
                                      "re-save the checkpoint")
        self.files: dict[str, Path] = stored  # tensor name -> file

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, group in by_file.items():
            with open(path, "rb") as f:
                for name in group:
                    info = self.headers[path][name]
                    data = torch.empty(info.end - info.start, dtype=torch.uint8)
                    f.seek(info.start)
                    if f.readinto(memoryview(data.numpy())) != info.end - info.start:
                        raise CheckpointError(f"{name} is truncated in {path}: the checkpoint file is incomplete; "
                                              "re-download or re-save the checkpoint")
                    out[name] = data.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)
        return out


def size_in_bytes(size: int | str) -> int:
    """``5_000_000``, ``"500MB"`` or ``"5GB"`` (decimal units, as transformers) in bytes."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: give bytes as an int or a string such as '500MB' or '5GB'")
    return int(float(match[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match[2]])


def format_size(size: int) -> str:
    """``170_654_321`` -> ``"170.7 MB"``: decimal units (1 MB = 10**6 bytes), the ones ``size_in_bytes``
    and transformers' ``max_shard_size`` read; every size hf-signround prints goes through here."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


class ShardWriter:
    """``add`` tensors in order; a new shard starts when the next tensor would pass ``max_shard_size``;
    ``close`` assembles the shards under their final names (with ``metadata`` in every header)
    and writes the index.

    Stale weight files of an earlier save in the folder are removed first: a leftover shard
    would otherwise be read alongside the new ones.
    """

    def __init__(self, folder: str | Path, max_shard_size: int | str = "5GB"):
        self.folder = Path(folder)
        self.limit = size_in_bytes(max_shard_size)
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in [*self.folder.glob("model*.safetensors"), self.folder / INDEX]:
            old.unlink(missing_ok=True)
        self.written: list[tuple[Path, dict[str, dict]]] = []  # per finished shard: data file, header
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
        """Finish the shard being filled: its data is complete; the file is assembled by ``close``."""
        if self._data is None:
            return
        self._data.close()
        self.written.append((Path(self._data.name), self._header))
        self._header, self._data, self._size = {}, None, 0

    def close(self, metadata: dict[str, str] | None = None) -> list[str]:
        """Write the shards under their final names, each header carrying ``metadata`` (strings);
        returns the files written."""
        self.flush()
        meta = {"format": "pt", **(metadata or {})}
        count = len(self.written)
        names = [WEIGHTS] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        for (data, header), name in zip(self.written, names):
            self._assemble(data, header, meta, name)
        if count == 1:
            return names
        weight_map = {key: name for (_, header), name in zip(self.written, names) for key in header}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [*names, INDEX]

    def _assemble(self, data: Path, header: dict[str, dict], metadata: dict[str, str], name: str) -> None:
        """One shard's file: 8-byte header length, the header, then its data file copied behind it."""
        raw = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        partial = self.folder / f".{name}.tmp"  # the final name only once complete
        with open(partial, "wb") as out, open(data, "rb") as src:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(src, out, 16 * 2**20)
        data.unlink()
        partial.rename(self.folder / name)
