"""Advisory file locks (``flock``): one command per output folder, one process per attack cell, one writer at a time
per appended file. A kill releases them; where the system or file system has none, work goes on unlocked."""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from seamlm.errors import ConfigError

log = logging.getLogger(__name__)

#: errors of a file system without locks (NFS without lockd, Lustre mounted noflock, …)
_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_warned: set[str] = set()


def lock_open_file(fh: IO[Any], where: Path, *, wait: bool, shared: bool = False) -> bool:
    """Lock the open file ``fh`` exclusively (``shared``: beside other readers): True once this process holds it (or
    nothing can be locked here: warned once per folder), False when another process holds it and ``wait`` is false.
    Closing ``fh`` releases it."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return True
    try:
        fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        if str(where.parent) not in _warned:
            _warned.add(str(where.parent))
            log.warning("%s: this file system cannot lock files (%s): not locked; run one command at a time on it",
                        where.parent, exc.strerror)
    return True


_HOLDER = re.compile(r", pid (\d+) on (\S+),")


def _alive(line: str) -> bool:
    """Whether the process a holder line names may still run (one of another host is not checked)."""
    m = _HOLDER.search(line)
    if m is None or m.group(2) != socket.gethostname():
        return True
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except OSError:  # (alive, another user's)
        return True
    return True


class HolderLock:
    """A lock file that names its holder (``seamlm <command>, pid …, since …``) for the process that finds it taken."""

    def __init__(self, path: str | Path, command: str) -> None:
        self.path, self.command = Path(path), command
        self._fh: IO[str] | None = None
        self._line = ""

    def acquire(self, wait: bool = False, shared: bool = False) -> bool:
        """True once held; False when another process holds it and ``wait`` is false (``holder()`` says who).
        ``shared``: beside other shared holders (each adds its line), never beside an exclusive one (which starts
        the file afresh)."""
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = self.path.open("a+", encoding="utf-8")
            try:
                if not lock_open_file(fh, self.path, wait=wait, shared=shared):
                    fh.close()
                    return False
            except BaseException:
                fh.close()
                raise
            if self._is_the_file_at_path(fh):
                break
            fh.close()  # locked a file its holder removed (:meth:`discard`) after this process opened it: again
        try:
            if not shared:
                fh.seek(0)
                fh.truncate()
            self._line = (f"seamlm {self.command}, pid {os.getpid()} on {socket.gethostname()}, "
                          f"since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
            fh.write(self._line + "\n")
            fh.flush()
        except BaseException:
            fh.close()
            raise
        self._fh = fh
        return True

    def _is_the_file_at_path(self, fh: IO[str]) -> bool:
        try:
            return os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def discard(self) -> bool:
        """Remove the lock file and release it, if this process alone holds it (a shared holder takes it over
        exclusively first, without waiting); else leave the file to the others and only release. True if removed.
        A process that opened the file just before finds, once it has locked it, that it is no longer the file at
        the path, and locks the next one (:meth:`acquire`)."""
        removed = False
        if self._fh is not None and lock_open_file(self._fh, self.path, wait=False):
            try:
                self.path.unlink()
                removed = True
            except OSError:
                pass
        self.release()
        return removed

    def holder(self) -> str:
        """Who holds the lock, as its holders wrote it, less the processes of this host that have ended ('unknown'
        before a holder has written)."""
        try:
            lines = [ln for ln in self.path.read_text(encoding="utf-8").split("\n") if ln.strip()]
        except OSError:
            return "unknown"
        return "; ".join(ln for ln in lines if _alive(ln)) or "unknown"

    def release(self) -> None:
        """Release the lock (the file stays: removing it would race a process about to lock it)."""
        if self._fh is not None:
            try:  # its line goes (best effort: a holder appending at this moment may lose its line, not its lock)
                self._fh.seek(0)
                lines = self._fh.read().split("\n")
                if self._line in lines:
                    lines.remove(self._line)
                    self._fh.seek(0)
                    self._fh.truncate()
                    self._fh.write("\n".join(ln for ln in lines if ln) + ("\n" if any(lines) else ""))
                    self._fh.flush()
            except OSError:
                pass
            finally:
                self._fh.close()
                self._fh = None


@contextmanager
def holding(path: str | Path, command: str, refusal: Callable[[str], str], shared: bool = False) -> Iterator[None]:
    """Hold the :class:`HolderLock` at ``path`` for the block, without waiting: taken, a ConfigError whose message
    ``refusal`` makes from the holders' description."""
    lock = HolderLock(path, command)
    if not lock.acquire(shared=shared):
        raise ConfigError(refusal(lock.holder()))
    try:
        yield
    finally:
        lock.release()
