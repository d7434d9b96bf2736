"""Work split across ranks and gathered through files: rank r takes items r, r+W, ...; each rank writes its part
atomically beside the result, and one rank reads them all back. No process group is needed, so a rank that dies
cannot hang a collective: the reader gives up after a timeout and names the rank it is missing."""
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ldm.utils.atomic import atomic_torch_save, atomic_write_text


def rank_share(n: int, rank: int, world_size: int) -> list[int]:
    """The indices of n items that `rank` of `world_size` processes handles (strided: every rank gets a spread)."""
    return list(range(rank, n, world_size))


def part_path(result: Path, rank: int, world_size: int) -> Path:
    return result.with_name(f"{result.name}.rank{rank}-of-{world_size}")


def failure_path(result: Path, rank: int, world_size: int) -> Path:
    return result.with_name(f"{result.name}.rank{rank}-of-{world_size}.failed")


def clear_failure(result: Path, rank: int, world_size: int) -> None:
    """Drop this rank's failure note of an earlier try, as it starts again."""
    failure_path(result, rank, world_size).unlink(missing_ok=True)


def write_part(result: Path, rank: int, world_size: int, part: dict) -> None:
    """This rank's share of `result` (tensors and plain values), written atomically: a reader never sees half."""
    atomic_torch_save(part, part_path(result, rank, world_size))


def write_failure(result: Path, rank: int, world_size: int, message: str) -> None:
    """A note that this rank will never write its part, so the reader fails now instead of at its timeout."""
    atomic_write_text(failure_path(result, rank, world_size), message)


def gather_parts(result: Path, world_size: int, timeout_s: float, poll_s: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> list[dict]:
    """Every rank's part of `result`, in rank order, waiting up to `timeout_s` for the missing ones."""
    deadline = clock() + timeout_s
    paths = [part_path(result, r, world_size) for r in range(world_size)]
    while True:
        for rank in range(world_size):
            failed = failure_path(result, rank, world_size)
            if failed.is_file():
                raise RuntimeError(f"rank {rank} of {world_size} failed: {failed.read_text().strip()}")
        missing = [r for r, p in enumerate(paths) if not p.is_file()]
        if not missing:
            return [torch.load(p, weights_only=True) for p in paths]
        if clock() > deadline:
            raise TimeoutError(f"rank {missing[0]} of {world_size} wrote no {paths[missing[0]].name} in "
                              f"{timeout_s:g} s (task.gather_timeout_s): did it fail or not start? see its log")
        time.sleep(poll_s)


def remove_parts(result: Path, world_size: int) -> None:
    """Drop the parts (and failure notes of an earlier try) once their union is written."""
    for rank in range(world_size):
        part_path(result, rank, world_size).unlink(missing_ok=True)
        failure_path(result, rank, world_size).unlink(missing_ok=True)
