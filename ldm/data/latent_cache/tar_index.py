"""Where each record's members lie in a shard: from the sidecar's compact index (O(1) per shard at start-up), or for
caches written before it, parsed from the USTAR headers alone, without extracting anything.

The writer puts a record's members one after another, json first, each as a 512-byte header plus its data padded
to whole blocks. Every member but the json has the same size in every record, so a record's json size fixes
where all its members lie: the index stores per record only its position in the shard and its json size. With
aspect-ratio buckets the other sizes are fixed per bucket, and the index also stores each record's bucket.
"""
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TAR_BLOCK = 512


def read_tar_headers(path: Path) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each member of a USTAR tar, reading only its 512-byte headers.

    tarfile builds an object per member and is ~10x slower; with millions of members that is minutes per rank.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        end, position = os.fstat(fd).st_size, 0
        while position + TAR_BLOCK <= end:
            header = os.pread(fd, TAR_BLOCK, position)
            if header.count(0) == TAR_BLOCK:  # end-of-archive marker
                return
            if header[156:157] not in (b"0", b"\0"):
                raise ValueError(f"{path}: member at byte {position} is not a regular file (type {header[156:157]!r})")
            name = header[:100].rstrip(b"\0").decode()
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            if position + TAR_BLOCK + size > end:
                raise ValueError(f"{path}: member {name!r} runs past the end of the file (truncated shard)")
            yield name, position + TAR_BLOCK, size
            position += TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK  # data padded to whole blocks
        raise ValueError(f"{path}: no end-of-archive marker (truncated shard)")
    finally:
        os.close(fd)


def index_shard(path: Path, members: list[str]) -> tuple[list[int], np.ndarray]:
    """Sample indices and member (data offset, size) [n, M, 2] of one shard, from its tar headers (no extraction)."""
    rows: dict[int, dict[str, tuple[int, int]]] = {}
    for name, offset, size in read_tar_headers(path):
        stem, _, ext = name.partition(".")
        rows.setdefault(int(stem), {})[ext] = (offset, size)
    missing = [index for index, found in rows.items() if not set(members) <= found.keys()]
    if missing:
        raise ValueError(f"{path}: samples {missing[:5]} lack members of {members} (truncated or foreign shard)")
    indices = sorted(rows)
    spans = np.array([[rows[i][m] for m in members] for i in indices], dtype=np.int64).reshape(len(indices), len(members), 2)
    return indices, spans


def padded(size: int | np.ndarray) -> int | np.ndarray:
    """Bytes a member's data occupies: its size rounded up to whole 512-byte blocks."""
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def fixed_member_bytes(fixed_bytes: list[int]) -> int:
    """Bytes a record's members after its json take in the tar, headers and padding included."""
    return sum(TAR_BLOCK + padded(size) for size in fixed_bytes)


def json_offsets(json_bytes: np.ndarray, fixed_bytes: list[int] | np.ndarray) -> np.ndarray:
    """Data offset [n] of each record's json member in a shard written record after record (see the docstring).

    `fixed_bytes`: the other members' sizes, the same for every record; or, where records differ (aspect-ratio
    buckets), each record's fixed_member_bytes [n].
    """
    fixed = fixed_member_bytes(fixed_bytes) if isinstance(fixed_bytes, list) else fixed_bytes.astype(np.int64)
    records = TAR_BLOCK + padded(json_bytes.astype(np.int64)) + fixed  # bytes of each whole record
    return TAR_BLOCK + np.cumsum(records) - records  # each record starts where the ones before it end


def member_spans(offset: int, json_bytes: int, fixed_bytes: list[int]) -> list[tuple[int, int]]:
    """(data offset, size) of one record's members, json first, from its json member's offset and size."""
    spans, position = [(offset, json_bytes)], offset + padded(json_bytes)
    for size in fixed_bytes:
        spans.append((position + TAR_BLOCK, size))
        position += TAR_BLOCK + padded(size)
    return spans


def compact_index(indices: list[int], spans: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """(json sizes [n], the other members' sizes) of a header-scanned shard, checked to follow the writer's layout."""
    json_bytes, fixed_bytes = spans[:, 0, 1], spans[0, 1:, 1].tolist() if len(spans) else []
    offsets = json_offsets(json_bytes, fixed_bytes)
    expected = np.array([member_spans(o, n, fixed_bytes) for o, n in zip(offsets.tolist(), json_bytes.tolist())])
    if len(spans) and not np.array_equal(expected.reshape(spans.shape), spans):
        raise ValueError("shard members are not laid out record after record, json first (not written by ldm)")
    return json_bytes, fixed_bytes
