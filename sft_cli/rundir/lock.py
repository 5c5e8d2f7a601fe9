"""One trainer per run directory: `.sft.lock`, held with an OS file lock for the whole run.

The lock is `flock` on the file: the kernel releases it when its process dies (even by `kill -9`), so a
lock left behind is free to take, and taking it is one atomic system call — two processes can never both
hold it, whatever they find in the file. The file records the holder's pid, host, command and start time,
for the error a second trainer gets and for `sft runs`. `--overwrite` never overrides a live lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from sft_cli.errors import SftError

LOCK_FILE = ".sft.lock"


def _start_time(pid: int) -> Optional[str]:
    """The kernel's start time of a process (Linux), recorded for people reading the lock."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _recorded(path: Path) -> dict[str, Any]:
    """What the lock file says about its holder (garbage reads as nothing)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def holder(run_dir: Path) -> Optional[dict[str, Any]]:
    """The live holder of the run's lock (what its file records), or None when nobody holds it."""
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return _recorded(path) or {"pid": "?"}
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """Context manager: hold `run_dir/.sft.lock` while training; release it (and remove the file) on the way out."""

    def __init__(self, run_dir: Path, command: str = "train"):
        self.path = run_dir / LOCK_FILE
        self.command = command
        self.fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> RunLock:
        try:
            return self._take()
        except OSError as err:
            raise SftError(
                f"output.dir: cannot write to {self.path.parent} ({err.strerror or err}) — choose a writable directory"
            ) from None

    def _take(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        busy = 0
        for _ in range(100):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                busy += 1
                if busy < 5:  # `sft runs` may be probing the lock for a moment
                    time.sleep(0.05)
                    continue
                live = _recorded(self.path)
                raise SftError(
                    f"output.dir: {self.path.parent} is in use by pid {live.get('pid', '?')} on "
                    f"{live.get('host', '?')} (`sft {live.get('command', 'train')}` since {live.get('since', '?')}) "
                    "— wait for it, or set output.dir to another directory"
                ) from None
            if not self._same_file(fd):  # the holder removed the file between our open and our lock: again
                os.close(fd)
                continue
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "start_time": _start_time(os.getpid()),
                "command": self.command,
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            self.fd = fd
            return self
        raise SftError(f"output.dir: could not take the lock {self.path} — another process keeps taking it")

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # removed while still held, so no one locks a file about to vanish
            os.close(self.fd)
            self.fd = None
