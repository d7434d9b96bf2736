"""Samples of one input tar shard (webdataset / img2dataset layout), read as a stream: local paths, URLs and
`pipe:` commands alike (webdataset's gopen).

Members `{key}.{ext}` that follow each other form one sample (the key is the name up to the first dot of the
file name, its folder included), as webdataset groups them. A tar that ends early is never silent: tarfile reads
a tar cut between or inside headers as a normal end, so the bytes after the last member are checked for the
end-of-archive block, and the sample in progress at the cut is marked with `__error__`.
"""
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from webdataset import gopen


class CountingReader:
    """A read-only stream that counts the bytes it delivered (where the tar really ended)."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.bytes = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _split_name(name: str) -> tuple[str, str] | None:
    """`dir/KEY.ext.more` -> ("dir/KEY", "ext.more"); None for a member without an extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def tar_samples(stream: BinaryIO, url: str) -> Iterator[dict]:
    """Grouped samples `{"__key__": key, ext: bytes, ...}` of one uncompressed tar stream, in tar order.

    A read error or a cut before the end-of-archive block ends the shard: the sample in progress (or an empty one
    if none was) carries `__error__`, to be counted as a truncated tar member.
    """
    reader, sample, end_of_members = CountingReader(stream), None, 0
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                end_of_members = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                split = _split_name(member.name) if member.isfile() else None
                if split is None:
                    continue
                key, ext = split
                if sample is not None and sample["__key__"] != key:  # a new key: the previous sample is whole
                    yield sample
                    sample = None
                sample = sample or {"__key__": key}
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name!r}: {len(data)} of {member.size} bytes")
                sample[ext] = data
        reader.drain()
        if reader.bytes < end_of_members + tarfile.BLOCKSIZE:  # no end-of-archive block: cut at or in a header
            raise tarfile.ReadError(f"ends at byte {reader.bytes} without an end-of-archive block")
    except (tarfile.TarError, EOFError, OSError) as err:
        yield {**(sample or {"__key__": f"{url}@{reader.bytes}"}), "__error__": f"{url}: {type(err).__name__}: {err}"}
        return
    if sample is not None:
        yield sample


def open_shard(url: str) -> BinaryIO:
    """A local path, URL or `pipe:command` as a binary stream (a failing pipe raises on close)."""
    return gopen(url, "rb")
