"""One run per directory: a lock that a second `task=fit` on the same run directory is refused by.

The lock is a file `<run_dir>/lock/G` created with O_EXCL, holding the owner record (host, boot, pid; see
ownership.py) and touched every `heartbeat_s` by a daemon thread. A lock whose owner is gone (dead pid, reused pid,
another boot, or from another host a heartbeat older than `stale_after_s`) is taken over by creating generation
G + 1, which, again through O_EXCL, only one process can do.
"""
import json
import os
import threading
import time
from pathlib import Path

from ldm.utils.errors import ConfigError
from ldm.utils.ownership import describe, owner_gone, owner_record


def _generations(lock_dir: Path) -> list[int]:
    return sorted(int(n) for n in os.listdir(lock_dir) if n.isdigit()) if lock_dir.is_dir() else []


def _read(path: Path) -> tuple[dict | None, float]:
    """The owner record (None while being written or unreadable) and the heartbeat age in seconds."""
    try:
        age_s = time.time() - path.stat().st_mtime
        return json.loads(path.read_text()), age_s
    except FileNotFoundError:
        return None, float("inf")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, age_s


class RunLock:
    """Exclusive ownership of a run directory by this process, held from `acquire` until `release`."""

    def __init__(self, run_dir: str | Path, stale_after_s: float = 300.0, heartbeat_s: float = 30.0):
        if heartbeat_s >= stale_after_s:
            raise ValueError(f"heartbeat_s ({heartbeat_s}) must be shorter than stale_after_s ({stale_after_s})")
        self.dir = Path(run_dir) / "lock"
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.path: Path | None = None
        self._stop = threading.Event()

    def acquire(self) -> "RunLock":
        """Take the lock, or raise ConfigError naming the process that holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        generations = _generations(self.dir)
        if generations:
            owner, age_s = _read(self.dir / str(generations[-1]))
            if not owner_gone(owner, age_s, self.stale_after_s):
                raise ConfigError(
                    f"{self.dir.parent} is in use by {describe(owner, age_s)}: one run per directory. Wait for it, "
                    f"stop it, or pick another `name=` (a lock from another host is taken over after "
                    f"{self.stale_after_s:.0f} s without heartbeat: `lock_stale_s`)"
                )
        path = self.dir / str(generations[-1] + 1 if generations else 0)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise ConfigError(f"{self.dir.parent} was just taken by another process: one run per directory") from None
        with os.fdopen(fd, "w") as f:
            json.dump(owner_record(), f)
        for older in generations:  # the previous owners are gone: their files only mislead
            (self.dir / str(older)).unlink(missing_ok=True)
        self.path = path
        threading.Thread(target=self._beat, daemon=True, name="run-lock-heartbeat").start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:  # released, or taken over by someone who thought us dead
                return

    def release(self) -> None:
        self._stop.set()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
