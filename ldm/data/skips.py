"""Skipped (corrupt) data: a counter shared by DataLoader workers, and the skip markers map-style datasets return.

A map-style dataset cannot leave an index out, so with `on_corrupt="skip"` it returns a marker
(`skipped_item`) for a damaged file or record; `collate_kept` drops markers from a batch and `kept_batches`
drops a batch that held only markers. Nothing is substituted: a skip costs one sample of one batch.
"""

import logging
import multiprocessing
from collections.abc import Iterable, Iterator
from multiprocessing.context import get_spawning_popen
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate

from ldm.utils.errors import ConfigError, CorruptDataError

log = logging.getLogger(__name__)

ON_CORRUPT = ("raise", "skip")


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


def check_on_corrupt(value: str, key: str) -> str:
    """`value` if it is one of ON_CORRUPT, else a ConfigError naming the config `key`."""
    if value not in ON_CORRUPT:
        raise ConfigError(f"{key} must be one of {ON_CORRUPT}, got {value!r}")
    return value


def skipped_item(key: str, reason: str, message: str) -> dict:
    """What a map-style dataset returns for an item it skips: the item's key, a short reason and the error."""
    return {"skip": reason, "key": key, "message": message}


def is_skipped(item: Any) -> bool:
    """Whether `item` is a skip marker (see skipped_item)."""
    return isinstance(item, dict) and "skip" in item


def collate_kept(items: list) -> Any:
    """default_collate of the items that are not skip markers; None when every item of the batch was skipped."""
    kept = [item for item in items if not is_skipped(item)]
    return default_collate(kept) if kept else None


def kept_batches(batches: Iterable) -> Iterator:
    """The batches that hold at least one item (see collate_kept).

    A rank that left out a batch would run one step fewer than the others and stall DDP, so under a process
    group an all-skipped batch is an error instead.
    """
    for batch in batches:
        if batch is not None:
            yield batch
        elif torch.distributed.is_available() and torch.distributed.is_initialized() and (
            torch.distributed.get_world_size() > 1
        ):
            raise CorruptDataError(
                "every item of a batch was skipped as corrupt (see the logged keys), and a rank that drops a whole "
                "batch stalls the others: remove the damaged files or use a larger batch size"
            )


class KeptLoader(DataLoader):
    """A DataLoader for datasets that may return skip markers: pass collate_fn=collate_kept; all-skipped batches are
    left out (kept_batches)."""

    def __iter__(self) -> Iterator:
        return kept_batches(super().__iter__())
