"""Who owns a file-based lock (a run directory, a cache shard), and whether that owner is gone.

An owner record names the host, the boot, the pid and the pid's start time. On the owner's own host the answer is
exact: another boot id means the machine rebooted since (the pid may be reused by now), a dead pid or one whose
start time differs (reused within the same boot) means the owner died. From another host only the heartbeat (the
lock file's mtime, touched by the owner) can tell, so a lock is taken over there when it is older than a limit.
"""
import os
import socket
import time
from pathlib import Path


def boot_id() -> str:
    """This machine's boot id (Linux; empty elsewhere): it changes at every reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """The pid's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); empty if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name, which may hold spaces


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def owner_record() -> dict:
    """This process as a lock owner: host, boot, pid, pid start time, wall-clock time taken."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": boot_id(), "pid": pid, "pid_start": process_start(pid),
            "time": time.time()}


def owner_gone(owner: dict | None, heartbeat_age_s: float, stale_after_s: float) -> bool:
    """Whether the lock's owner is gone: exactly on its own host, by heartbeat age from any other."""
    if owner is None or owner.get("host") != socket.gethostname():
        return heartbeat_age_s > stale_after_s
    if owner.get("boot_id") and owner["boot_id"] != boot_id():
        return True  # rebooted since: whatever runs under that pid now is not the owner
    pid = int(owner["pid"])
    if not process_alive(pid):
        return True
    return bool(owner.get("pid_start")) and process_start(pid) != owner["pid_start"]


def describe(owner: dict | None, heartbeat_age_s: float) -> str:
    """`pid 123 on host h (heartbeat 4 s ago)` for error messages."""
    if owner is None:
        return f"an unknown process (heartbeat {heartbeat_age_s:.0f} s ago)"
    return f"pid {owner.get('pid')} on host {owner.get('host')} (heartbeat {heartbeat_age_s:.0f} s ago)"
