"""Writing files atomically: readers see the old file or the complete new one, never a part."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from pathlib import Path


def atomic_write_text(target: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``target``, sync it, then rename it over."""
    directory = target.parent
    temporary = directory / f".{target.name}.{uuid.uuid4().hex}.tmp"
    # O_EXCL: never write into someone else's file; 0o666 lets the umask decide, as open() does.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(temporary, flags, 0o666)
    except FileNotFoundError:
        # Name the missing directory rather than the temporary file the caller never asked for.
        raise FileNotFoundError(errno.ENOENT, "No such directory", str(directory)) from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        with contextlib.suppress(OSError):  # overwriting keeps the existing file's permissions
            os.chmod(temporary, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable on POSIX; where directories cannot be opened, skip it.
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
