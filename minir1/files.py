"""Reading and writing the files a user hands us or relies on, safely.

Reading: JSON and text files decoded as strict UTF-8, with every failure (bad bytes, bad JSON, nesting
deeper than Python's recursion limit) turned into one error of the caller's type that names the file and
the line. Writing: every file goes to a temporary file beside its target, is flushed to disk, and is then
renamed over it, so a crash or a full disk at any moment leaves either the old file or the new one, never
a torn one or none.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


class DiskFullError(OSError):
    """The disk filled up while writing; what was there before is intact."""


def decode_utf8(data: bytes, where: str, error: type[Exception]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{where}: line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") \
            from None


def parse_json(text: str, where: str, error: type[Exception]) -> Any:
    """json.loads with errors that name `where` (a file, or file:line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to read") from None


def read_text(path: Path, error: type[Exception]) -> str:
    return decode_utf8(Path(path).read_bytes(), str(path), error)


def read_json(path: Path, error: type[Exception]) -> Any:
    return parse_json(read_text(path, error), str(path), error)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an error, the file written
    there is flushed to disk and renamed over `path`. On any error the temporary file is removed and
    `path` is untouched; a full disk is reported as DiskFullError naming the file."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the file it replaces was not
    try:
        with disk_full_means(f"could not write {path}; what was there before is intact"):
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (see atomic_path)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (POSIX: the directory entry lives in the directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC, whether raised by Python (OSError) or by a native writer that reports it in its message
    (safetensors' Rust writer)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


@contextlib.contextmanager
def disk_full_means(consequence: str) -> Iterator[None]:
    """Turn a full disk raised inside the block, by Python or a native writer, into DiskFullError("the disk
    is full: <consequence>"); other errors pass through."""
    try:
        yield
    except BaseException as e:
        if is_disk_full(e):
            raise DiskFullError(errno.ENOSPC, f"the disk is full: {consequence}") from e
        raise


@contextlib.contextmanager
def replacing(directory: str | Path, stale: tuple[str, ...] = ()) -> Iterator[Path]:
    """Stage a set of files and publish them together into `directory`.

    Yields an empty staging directory inside `directory`; write the new files there. When the block ends
    without an error, every file is flushed to disk and renamed over its namesake in `directory` (the
    renames take microseconds; the writing, where a kill or a full disk strikes, is already done), then the
    files matching the `stale` globs that the new set does not contain are removed. On any error, or a
    kill, `directory` keeps exactly what it had (a killed run leaves only a hidden `.staging-*` folder,
    which the next save removes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob(".staging-*"):
        shutil.rmtree(old, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
    try:
        with disk_full_means(f"could not write into {directory}; the files already there are intact"):
            yield staging
            names = sorted(p.name for p in staging.iterdir() if p.is_file())
            for name in names:
                with open(staging / name, "rb") as f:
                    os.fsync(f.fileno())
        # config.json last: a reader that sees the new config sees the new weights beside it.
        for name in sorted(names, key=lambda n: n == "config.json"):
            os.replace(staging / name, directory / name)
        for pattern in stale:
            for old in directory.glob(pattern):
                if old.name not in names and old.is_file():
                    old.unlink()
        fsync_dir(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
