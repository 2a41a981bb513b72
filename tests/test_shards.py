"""The streamed safetensors writer: files safetensors reads back exactly, sharding, stale files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hf_signround.shards import CheckpointError, ShardWriter, format_size, read_header, size_in_bytes

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
    assert not list(tmp_path.glob(".*"))  # no temporary file left


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


@pytest.mark.parametrize("size,text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (170_654_321, "170.7 MB"),
                                       (162_900_000, "162.9 MB"), (5 * 10**9, "5.0 GB")])
def test_sizes_print_in_decimal_units(size, text):
    assert format_size(size) == text
    assert abs(size_in_bytes(text.replace(" ", "")) - size) <= 0.05 * size  # read back as max_shard_size reads it


def test_metadata_goes_into_every_shard(tmp_path):
    writer = ShardWriter(tmp_path, 1500)
    for i in range(3):
        writer.add(f"w{i}", torch.zeros(250))
    files = writer.close({"layout": "abc"})
    assert len(files) == 4
    for name in files[:3]:
        with safe_open(str(tmp_path / name), "pt") as f:
            assert f.metadata() == {"format": "pt", "layout": "abc"}
        assert read_header(tmp_path / name).metadata == {"format": "pt", "layout": "abc"}


def test_read_header_matches_safetensors(tmp_path):
    tensors = sample()
    writer = ShardWriter(tmp_path)
    for k, v in tensors.items():
        writer.add(k, v)
    writer.close()
    header = read_header(tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(header.tensors) == set(f.keys())  # noqa: SIM118 - not iterable
        for name, info in header.tensors.items():
            assert info.shape == tuple(f.get_slice(name).get_shape()) and info.dtype == f.get_slice(name).get_dtype()
            expected = tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert data[info.start : info.end] == expected, name


def _damaged(tmp_path, change) -> tuple[str, int]:
    """The error of reading a small file after ``change``, and the undamaged file's size."""
    writer = ShardWriter(tmp_path)
    writer.add("a", torch.arange(6, dtype=torch.float32))
    writer.add("b", torch.ones(2, 3, dtype=torch.float16))
    writer.close()
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(change(data))
    with pytest.raises(CheckpointError) as err:
        read_header(path)
    message = str(err.value)
    assert message.startswith(f"{path} is not a valid safetensors file: ")
    assert message.endswith(": re-download or re-save the checkpoint")
    return message, len(data)


def _length(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


def _edit(old: bytes, new: bytes):
    """Replace text in the JSON header, its length field kept right."""
    def change(data: bytes) -> bytes:
        header = data[8 : 8 + _length(data)].replace(old, new)
        return len(header).to_bytes(8, "little") + header + data[8 + _length(data) :]
    return change


@pytest.mark.parametrize("change, reason", [
    (lambda d: d[:5], "the file has 5 bytes, fewer than the 8-byte header length"),
    (lambda d: d[:40], "the file has 40 bytes, fewer than its header length field says"),
    (lambda d: d[:-1], "its tensors end at byte {size} but the file has {less} bytes (it was cut short)"),
    (lambda d: d + b"\0", "its tensors end at byte {size} but the file has {more} bytes."),
    # one byte less of header: the JSON still parses (a padding space is cut), the data would shift
    (lambda d: (_length(d) - 1).to_bytes(8, "little") + d[8:], "its tensors end at byte {less} but the file has {size} "
                                                               "bytes."),
    (_edit(b'"F16"', b'"X16"'), "tensor b has unknown dtype 'X16'"),
    (_edit(b'"shape":[2,3]', b'"shape":[2,4]'), "tensor b (F16, shape [2, 4]) does not fit its 12-byte"),
    (_edit(b'"shape":[6]', b'"shape":[6.0]'), "tensor a has an invalid shape [6.0]"),
    (_edit(b'"shape":[2,3]', b'"shape":[2,-3]'), "tensor b has an invalid shape [2, -3]"),
    (_edit(b'"data_offsets":[0,24]', b'"data_offsets":[0,25]'), "tensor a (F32, shape [6]) does not fit"),
    (_edit(b'"data_offsets":[24,36]', b'"data_offsets":[26,38]'), "tensor b starts at byte"),
    (_edit(b'"shape":[6]', b'"shapes":[6]'), "the entry of tensor a is not {{dtype, shape, data_offsets}}"),
    (_edit(b'"format":"pt"', b'"format":1'), "its __metadata__ is not a dict of strings"),
    (lambda d: d[:1] + b"\x01" + d[2:], "fewer than its header length field says"),  # 256 bytes more of header
    (lambda d: d.replace(b'{"__metadata__"', b'["__metadata__"'), "its header is not valid JSON"),
])
def test_damaged_headers_name_the_file(tmp_path, change, reason):
    message, size = _damaged(tmp_path, change)
    assert reason.format(size=size, less=size - 1, more=size + 1) in message, message
