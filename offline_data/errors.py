"""UserError, the hook that prints it as one line, atomic file writes whose failure is one, the
lock that keeps two processes out of one folder, and the one that makes a process wait for another.

The data layer, common.py and the tools all use these; the algorithm files reach them through
`common` (common.UserError, ...). Importing this module changes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import tempfile
import threading
from typing import Any


class UserError(Exception):
    """A problem with the user's input. Scripts print it as one line, without a traceback."""


# A write the disk refused (full, over a quota or a file-size limit, read-only). Our own writes turn
# it into a UserError (atomic_write_bytes); a library's (tensorboard's event writer) is reported the
# same way by the hooks below.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _refused_write(exc) -> bool:
    return isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS


def _excepthook(exc_type, exc, tb):
    if issubclass(exc_type, UserError):
        print(f"error: {exc}", file=sys.stderr)
        return
    if _refused_write(exc):
        print(f"error: could not write {exc.filename or 'a file'}: {exc.strerror}", file=sys.stderr)
        return
    sys.__excepthook__(exc_type, exc, tb)


def _thread_excepthook(hook_args):
    # tensorboard's writer thread keeps the error and raises it again in the main thread at the next
    # write, where _excepthook reports it: printing it here as well would make it two tracebacks.
    if _refused_write(hook_args.exc_value):
        return
    threading.__excepthook__(hook_args)


def install_user_error_hook() -> None:
    """Make an uncaught UserError, or a write the disk refused, end the script with one line
    ("error: ...") and exit status 1 instead of a traceback. Every script calls this first;
    importing common changes nothing."""
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook


def atomic_write_bytes(path: str, payload: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file.

    A failure (no permission, a full disk) leaves the previous file as it was and no temporary file,
    and is a UserError naming the file: the one line a user needs, whichever script was writing."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private (0600); results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise UserError(f"could not write {path}: {exc.strerror or exc}") from None
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2).encode())


def save_checkpoint(path: str, obj: dict) -> None:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def lock_folder(folder: str, what_to_do: str):
    """Lock `folder` for this process with an exclusive flock on `<folder>/.lock`, so that two
    processes never write into it at once. Returns a context manager (the open lock file): closing
    it, or the end of the process (a kill included), releases the lock, so none is left stale. A
    folder another process holds is refused in one line naming that process and `what_to_do`.
    Without locks (not POSIX, a network file system without them, a read-only folder without a lock
    file) the folder is used unlocked."""
    import socket

    path = os.path.join(folder, ".lock")
    try:
        f = open(path, "a+")
    except OSError:
        try:  # a read-only folder: a lock on the existing file still keeps writers out
            f = open(path)
        except OSError:
            return contextlib.nullcontext()
    try:
        import fcntl
    except ImportError:
        return f
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"{folder} is in use by another process (pid {holder}); {what_to_do}") from None
    except OSError:
        return f
    if f.writable():
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} on {socket.gethostname()}")
        f.flush()
    return f


@contextlib.contextmanager
def waiting_lock(path: str, waiting: str):
    """Hold an exclusive flock on the file `path` for the block; while another process holds it,
    print `waiting` once and wait for it. Without locks (not POSIX, a file system without them, a
    lock file that cannot be opened) the block runs unlocked."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock
