"""Output folders: refused when they would destroy an input, replaced whole, untouched by a failed write."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hf_signround.outputs import check_output, staged_output


@pytest.fixture
def umask():
    """Set the process umask for a test: ``umask(0o077)``; the old one comes back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def modes(folder) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_check_output_refuses_what_would_destroy_an_input(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"^OUT {model} is the input {model}: writing there would destroy the input; "
                                         "choose another folder for OUT$"):
        check_output(model, sources=[model])
    with pytest.raises(ValueError, match=rf"^OUT {model}/q lies inside the input {model}: choose a folder outside it"):
        check_output(model / "q", sources=[model])
    with pytest.raises(ValueError, match=rf"^OUT {tmp_path} holds the input {model}: replacing OUT would delete it"):
        check_output(tmp_path, sources=[model], overwrite=True)
    # the same folder written another way is the same folder
    with pytest.raises(ValueError, match="is the input"):
        check_output(f"{tmp_path}/./model/../model", sources=[model])
    assert check_output(tmp_path / "elsewhere", sources=[model, None]) == tmp_path / "elsewhere"


def test_check_output_refuses_a_file_and_a_full_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=rf"^OUT {tmp_path}/file is a file, not a folder: choose a folder path for OUT"):
        check_output(tmp_path / "file", overwrite=True)
    with pytest.raises(ValueError, match=rf"^OUT {tmp_path}/file/q cannot be created: {tmp_path}/file is a file"):
        check_output(tmp_path / "file" / "q")
    with pytest.raises(ValueError, match=rf"^OUT {tmp_path} is not empty: pass --overwrite \(overwrite=True\) to "
                                         "replace its contents, or choose another folder$"):
        check_output(tmp_path)
    assert check_output(tmp_path, overwrite=True) == tmp_path
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty") == tmp_path / "empty"  # an empty folder needs no --overwrite


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_check_output_refuses_an_unwritable_place(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(ValueError, match=rf"cannot be written: {locked} is not writable"):
        check_output(locked / "q")


def test_staged_output_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json"):
        (out / name).write_text("an earlier, sharded save")
    with staged_output(out) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".out.tmp-") and not any(stage.iterdir())
        (stage / "model.safetensors").write_text("new")
        assert files(out)["model.safetensors.index.json"] == b"an earlier, sharded save"  # untouched until done
    assert files(out) == {"model.safetensors": b"new"}  # no stale shard or index survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or backup folder left


def test_staged_output_creates_missing_parents_with_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with staged_output(tmp_path / "a" / "b") as stage:
            (stage / "x").write_text("x")
    finally:
        os.umask(old)
    assert files(tmp_path / "a" / "b") == {"x": b"x"}
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o750  # not mkdtemp's 0700


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_out_as_it_was(tmp_path, error):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("the earlier checkpoint")
    with pytest.raises(type(error)):
        with staged_output(out) as stage:
            (stage / "model.safetensors").write_text("half")
            raise error
    assert files(out) == {"model.safetensors": b"the earlier checkpoint"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError):
        with staged_output(tmp_path / "new"):
            raise RuntimeError("stop")
    assert not (tmp_path / "new").exists()


def test_staged_output_without_overwrite_refuses_a_full_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(ValueError, match="is not empty: pass --overwrite"):
        with staged_output(tmp_path / "out", overwrite=False):
            pass
    assert files(tmp_path / "out") == {"x": b"x"}


def test_a_failed_final_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    from pathlib import Path

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".out.tmp-"):
            raise OSError("rename failed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        with staged_output(out) as stage:
            (stage / "keep").write_text("new")
    monkeypatch.undo()
    assert files(out) == {"keep": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_staged_output_gives_everything_the_mode_the_umask_gives(tmp_path, umask, mask):
    """save_pretrained's safetensors files are 0600 and mkdtemp's folders 0700 whatever the umask: OUT is not."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    umask(mask)
    with staged_output(tmp_path / "out") as stage:
        save_file({"w": torch.zeros(2)}, stage / "model.safetensors")
        assert stat.S_IMODE((stage / "model.safetensors").stat().st_mode) == 0o600  # the cause
        (stage / "config.json").write_text("{}")
        sub = Path(tempfile.mkdtemp(dir=stage))
        (sub / "run.sh").write_text("#!/bin/sh\n")
        (sub / "run.sh").chmod(0o700)
    out = tmp_path / "out"
    folder, file, script = 0o777 & ~mask, 0o666 & ~mask, 0o777 & ~mask
    assert modes(out) == {".": folder, "model.safetensors": file, "config.json": file, sub.name: folder,
                          f"{sub.name}/run.sh": script}
