"""Output folders that are never half-written and never replace their own input.

``check_output`` refuses, before any work, an output folder that is (or lies inside, or
holds) one of the inputs, that is a regular file, that cannot be created or written, or
that is not empty when overwriting was not asked for.

``staged_output`` yields a fresh hidden sibling folder (``.OUT.tmp-XXXX``) to write into
and moves it into place only when the block finishes: an existing OUT is renamed aside,
the new folder renamed to OUT, the old one deleted. On any exception, Ctrl-C included,
the temporary folder is removed and OUT is left exactly as it was. Since the whole folder
is replaced, no file of an earlier save (a stale shard or shard index) survives in it.
Before the move every file and folder in it gets the mode the umask gives (``follow_umask``):
safetensors' ``save_file`` (so ``save_pretrained``) and ``mkdtemp`` create theirs private
(0600, 0700), which breaks serving the checkpoint as another user.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["check_output", "follow_umask", "staged_output"]


def check_output(out: str | Path, sources: Iterable[str | Path | None] = (), overwrite: bool = False) -> Path:
    """Raise ``ValueError`` (naming the path and the fix) unless ``out`` can receive a new checkpoint.

    ``sources``: the inputs (folders or files; None entries are ignored) that ``out`` must
    neither be, lie inside, nor contain. ``overwrite``: whether a non-empty ``out`` may be
    replaced. Returns ``out`` as an absolute path.
    """
    out = Path(os.path.abspath(Path(out).expanduser()))
    real = out.resolve()
    for source in (Path(s).expanduser() for s in sources if s is not None):
        src = source.resolve()
        if real == src:
            raise ValueError(f"OUT {out} is the input {source}: writing there would destroy the input; choose another "
                             "folder for OUT")
        if src in real.parents:
            raise ValueError(f"OUT {out} lies inside the input {source}: choose a folder outside it for OUT")
        if real in src.parents:
            raise ValueError(f"OUT {out} holds the input {source}: replacing OUT would delete it; choose another "
                             "folder for OUT")
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} is a file, not a folder: choose a folder path for OUT (or remove the file)")
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise ValueError(f"OUT {out} is not empty: pass --overwrite (overwrite=True) to replace its contents, or "
                         "choose another folder")
    parent = _nearest_existing(out.parent)
    if not parent.is_dir():
        raise ValueError(f"OUT {out} cannot be created: {parent} is a file; choose another folder for OUT")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"OUT {out} cannot be written: {parent} is not writable; choose another folder for OUT")
    return out


@contextmanager
def staged_output(out: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a new empty folder beside ``out``; on success it becomes ``out`` (replacing it whole).

    ``overwrite=False`` refuses a non-empty ``out``, as ``check_output`` does.
    """
    out = check_output(out, overwrite=overwrite)
    if out.is_symlink():  # replace the folder it points to, not the link
        out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield stage
        follow_umask(stage)
        _replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def follow_umask(folder: str | Path) -> None:
    """Give ``folder``, and every file and folder in it, the mode a plain ``open``/``mkdir`` would:
    ``0o666 & ~umask`` for files (``0o777`` for ones executable by anyone), ``0o777 & ~umask`` for
    folders. Symbolic links are left alone."""
    umask = _umask()
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~umask)
        else:
            path.chmod((0o777 if path.stat().st_mode & 0o111 else 0o666) & ~umask)


def _replace(stage: Path, out: Path) -> None:
    """Rename ``stage`` to ``out``; an existing ``out`` is moved aside first and put back if that fails."""
    if not out.exists():
        stage.rename(out)
        return
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    out.rename(aside / out.name)
    try:
        stage.rename(out)
    except BaseException:
        (aside / out.name).rename(out)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)
    logger.info("replaced the earlier contents of %s", out)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask
