"""A counter of skipped (corrupt) data shared by the DataLoader worker processes."""

import logging
import multiprocessing
from multiprocessing.context import get_spawning_popen

log = logging.getLogger(__name__)


def _shared_int(value: int):
    """An int in shared memory that forked and spawned DataLoader workers increment and the main process reads."""
    # a lock made in the "fork" context refuses to travel to spawned workers; a "spawn" one works with both
    return multiprocessing.get_context("spawn").Value("q", value)


class SkipCounter:
    """Counts skipped items across worker processes; logs the 1st, 2nd, 4th, 8th, ... (seen, not spammed)."""

    def __init__(self, what: str):
        self.what = what
        self._shared = _shared_int(0)

    def add(self, key: str, reason: object) -> int:
        """Record one skipped item and return the running total."""
        with self._shared.get_lock():
            self._shared.value += 1
            count = self._shared.value
        if count & (count - 1) == 0:
            log.warning("skipped %s %r (%s); %d skipped so far", self.what, key, reason, count)
        return count

    @property
    def count(self) -> int:
        return self._shared.value

    def __getstate__(self) -> dict:
        # a shared value may only travel to a process being started; any other copy gets its own counter
        shared = self._shared if get_spawning_popen() is not None else None
        return {"what": self.what, "shared": shared, "count": self.count}

    def __setstate__(self, state: dict) -> None:
        self.what = state["what"]
        shared = state["shared"]
        self._shared = _shared_int(state["count"]) if shared is None else shared
