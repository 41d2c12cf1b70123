"""Crash-safe writes: a file or a whole directory appears complete under its final name, or not at all.

* :func:`atomic_write` writes a file through a temporary file in the same folder, ``fsync`` s it, then
  ``os.replace`` s it over the target and ``fsync`` s the folder.
* :func:`atomic_directory` is a context manager yielding a fresh temporary directory next to the target
  (``.<name>.tmp-<random>``); when the block finishes, every file in it is ``fsync`` ed and the directory is
  renamed to the target. When the block raises, the temporary directory is removed. A process killed in the
  middle leaves only the temporary directory behind (never a half-written target); :func:`remove_stale_temps`
  clears such leftovers.

Replacing an existing target directory takes two renames (old aside, new in), so a crash between them leaves
the target missing and the old copy under ``.<name>.old-<random>``; an existing target *file* is replaced
atomically.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_directory(root / "ckpt") as tmp:
    ...     _ = (tmp / "a.txt").write_text("hello")
    >>> (root / "ckpt" / "a.txt").read_text()
    'hello'
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_directory", "atomic_write", "fsync_dir", "is_temp_name", "remove_stale_temps"]

_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"


def _sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}{tag}{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary or set-aside name made by this module."""
    return name.startswith(".") and (_TMP_TAG in name or _OLD_TAG in name)


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` a directory so that renames inside it survive a power cut (a no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (bytes, str as UTF-8, or a function writing into a binary file object) to ``path``.

    The target is either left untouched or replaced by the complete new content. Returns ``Path(path)``.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: its directory {str(path.parent)!r} does not exist")
    tmp = _sibling(path, _TMP_TAG)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Build a directory under a temporary name; on success rename it to ``path``.

    Args:
        path: the final directory. Its parent is created if missing.
        overwrite: replace an existing ``path`` (default True); False raises FileExistsError up front.

    Yields the temporary directory (empty, on the same file system as ``path``).
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, _TMP_TAG)
    tmp.mkdir()
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                _fsync_file(Path(root) / name)
            fsync_dir(root)
        old = None
        if target.exists():
            old = _sibling(target, _OLD_TAG)
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporary files/directories this module left in ``folder`` (those of ``name`` only, if
    given), e.g. after a crash. Returns what was removed. Do not call while another process saves there."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if not is_temp_name(p.name):
            continue
        if name is not None and not p.name.startswith((f".{name}{_TMP_TAG}", f".{name}{_OLD_TAG}")):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed
