"""One trainer per run directory: a lock file naming the holder, taken atomically, stale ones taken over.

The lock records the holder's pid, host and process start time; a lock whose process is gone (killed
with -9, a crashed node) — or whose pid now belongs to another process — is stale and is taken over.
`--overwrite` never overrides a live lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from sft_cli.errors import SftError

LOCK_FILE = ".sft.lock"


def _start_time(pid: int) -> Optional[str]:
    """The kernel's start time of a process (Linux), which changes when a pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def holder(run_dir: Path) -> Optional[dict[str, Any]]:
    """The live holder of the lock, or None (no lock, or a stale one)."""
    try:
        info = json.loads((run_dir / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None
    pid = int(info.get("pid", 0))
    if info.get("host") != socket.gethostname():
        return info  # another machine's process: assume alive (a shared filesystem)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        return info
    recorded, now = info.get("start_time"), _start_time(pid)
    if recorded and now and recorded != now:
        return None  # the pid was reused by another process
    return info


class RunLock:
    """Context manager: hold `run_dir/.sft.lock` while training; release it on the way out."""

    def __init__(self, run_dir: Path, command: str = "train"):
        self.path = run_dir / LOCK_FILE
        self.command = command
        self.held = False

    def __enter__(self) -> RunLock:
        try:
            return self._take()
        except OSError as err:
            raise SftError(
                f"output.dir: cannot write to {self.path.parent} ({err.strerror or err}) — choose a writable directory"
            ) from None

    def _take(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start_time": _start_time(os.getpid()),
            "command": self.command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                live = holder(self.path.parent)
                if live is not None:
                    raise SftError(
                        f"output.dir: {self.path.parent} is in use by pid {live.get('pid')} on {live.get('host')} "
                        f"(`sft {live.get('command', 'train')}` since {live.get('since', '?')}) — wait for it, "
                        "or set output.dir to another directory"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            self.held = True
            return self
        raise SftError(f"output.dir: could not take the lock {self.path} — another process keeps taking it")

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
