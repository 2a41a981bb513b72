"""The streamed safetensors writer: files safetensors reads back exactly, sharding, stale files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hf_signround.shards import ShardWriter, size_in_bytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def sample() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        x = torch.randn(3, 5 + i, generator=gen) * 100
        out[f"t.{i}"] = x > 0 if dtype == torch.bool else x.to(dtype)
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 4)
    out["strided"] = torch.arange(12, dtype=torch.int32).reshape(3, 4).T  # not contiguous
    return out


def test_one_file_reads_back_exactly(tmp_path):
    tensors = sample()
    writer = ShardWriter(tmp_path, "1GB")
    for k, v in tensors.items():
        writer.add(k, v)
    assert writer.close() == ["model.safetensors"]
    back = load_file(str(tmp_path / "model.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert not list(tmp_path.glob("*.tmp"))


def test_shards_index_and_stale_files(tmp_path):
    (tmp_path / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    tensors = {f"w{i}": torch.full((250,), float(i)) for i in range(10)}  # 1000 bytes each
    writer = ShardWriter(tmp_path, 2500)
    for k, v in tensors.items():
        writer.add(k, v)
    files = writer.close()
    assert files == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)] + ["model.safetensors.index.json"]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == files[:-1]  # the stale shard is gone
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 10_000
    assert index["weight_map"] == {f"w{i}": files[i // 2] for i in range(10)}
    for i in range(10):
        assert torch.equal(load_file(str(tmp_path / files[i // 2]))[f"w{i}"], tensors[f"w{i}"])


def test_size_parsing():
    assert size_in_bytes("500MB") == 500_000_000 and size_in_bytes("5GB") == 5 * 10**9 and size_in_bytes(7) == 7
    with pytest.raises(ValueError, match="max_shard_size='big': give bytes as an int or a string such as"):
        size_in_bytes("big")
