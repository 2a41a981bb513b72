"""hf_signround.memory: dropping the resident pages of a memory-mapped file's tensors, and nothing else."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest
import torch

from hf_signround.memory import drop_file_pages

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps and uses madvise")


def _mapping(tensor: torch.Tensor) -> tuple[str, int]:
    """(permissions and path, resident KiB) of the mapping that holds ``tensor``, from /proc/self/smaps."""
    ptr, found = tensor.data_ptr(), None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and all(c in "0123456789abcdef-" for c in fields[0]):
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            found = " ".join([fields[1], *fields[5:]]) if lo <= ptr < hi else None
        elif found and line.startswith("Rss:"):
            return found, int(fields[1])
    raise AssertionError("no mapping holds the tensor")


@linux_only
def test_pages_of_a_private_file_mapping_are_dropped_and_read_back(tmp_path):
    values = torch.arange(4 * 2**20, dtype=torch.int32)  # 16 MiB
    path = tmp_path / "weights.bin"
    path.write_bytes(values.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=values.numel(), dtype=torch.int32)  # MAP_PRIVATE
    assert torch.equal(mapped, values)  # every page touched: resident
    where, before = _mapping(mapped)
    assert where.startswith("rw-p") and where.endswith(str(path)), where
    dropped = drop_file_pages(mapped[10:])  # a view starting inside a page: that page is kept
    assert values.numel() * 4 - 2 * mmap.PAGESIZE <= dropped < values.numel() * 4
    assert _mapping(mapped)[1] <= before - dropped // 1024 + 8
    assert torch.equal(mapped, values)  # read back from the file


@linux_only
def test_anonymous_memory_is_never_dropped():
    t = torch.arange(2**20, dtype=torch.int32)
    assert drop_file_pages(t) == 0
    assert torch.equal(t, torch.arange(2**20, dtype=torch.int32))
    assert drop_file_pages(torch.empty(0)) == 0
