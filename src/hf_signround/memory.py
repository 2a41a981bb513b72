"""Giving memory back to the operating system: freed heap chunks, and pages of memory-mapped checkpoints."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys
from pathlib import Path

import torch

_MADV_DONTNEED = 4


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed chunks for reuse, so a layer's
    temporaries, freed, can leave RSS higher for good (measured in streaming quantization: +10 MB
    per 13.6 MB block without this, +1.8 MB, the packed block, with it)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def drop_file_pages(tensor: torch.Tensor) -> int:
    """Drop this process's resident pages under ``tensor`` when it lies in a private mapping of a file.

    transformers memory-maps safetensors checkpoints, so a loaded tensor can be a view of the
    file's mapping, which lives on while other tensors of the file do: pages of a tensor that
    was converted and let go stay resident, and counted. Such pages hold the file's bytes, so
    dropping them loses nothing (a later read fetches them from the file again). Anonymous
    memory is never touched. Returns the bytes dropped (0 off Linux).
    """
    if sys.platform != "linux" or tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
    if last <= first or not _in_file_mapping(first, last):
        return 0
    libc = _libc()
    if libc is None or libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) != 0:
        return 0
    return last - first


def _in_file_mapping(first: int, last: int) -> bool:
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in fields[0].split("-"))
        if lo <= first and last <= hi:
            private, path = fields[1].endswith("p"), fields[5] if len(fields) > 5 else ""
            return private and path.startswith("/") and not path.endswith(" (deleted)")
    return False


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:  # not glibc: nothing to trim or advise
        return None
    if hasattr(libc, "madvise"):
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc
