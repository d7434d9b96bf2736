"""Work split by rank and gathered through files: disjoint shares, atomic parts, no endless wait for a lost rank."""
import pytest
import torch

from ldm.utils.rank_files import failure_path, gather_parts, rank_share, remove_parts, write_failure, write_part


def test_shares_are_disjoint_and_cover_every_item():
    shares = [rank_share(7, r, 3) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert rank_share(7, 0, 1) == list(range(7))


def test_parts_come_back_in_rank_order_then_are_removed(tmp_path):
    result = tmp_path / "samples.pt"
    for rank in (1, 0):
        write_part(result, rank, 2, {"indices": torch.tensor(rank_share(3, rank, 2)), "rank": rank})
    parts = gather_parts(result, 2, timeout_s=0)
    assert [p["rank"] for p in parts] == [0, 1] and parts[1]["indices"].tolist() == [1]
    remove_parts(result, 2)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_rank_is_named_after_the_timeout(tmp_path):
    result = tmp_path / "samples.pt"
    write_part(result, 0, 3, {})
    write_part(result, 2, 3, {})
    now = iter(range(100))  # a clock that moves one second per look
    message = r"rank 1 of 3 wrote no samples.pt.rank1-of-3 in 5 s \(task.gather_timeout_s\)"
    with pytest.raises(TimeoutError, match=message):
        gather_parts(result, 3, timeout_s=5, poll_s=0, clock=lambda: next(now))
    assert next(now) < 10  # gave up at the deadline, not later


def test_a_failed_rank_stops_the_wait_at_once(tmp_path):
    result = tmp_path / "samples.pt"
    write_part(result, 0, 2, {})
    write_failure(result, 1, 2, "OutOfMemoryError: CUDA out of memory")
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed: OutOfMemoryError: CUDA out of memory"):
        gather_parts(result, 2, timeout_s=3600)
    assert failure_path(result, 1, 2).name == "samples.pt.rank1-of-2.failed"
