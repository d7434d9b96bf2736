"""Atomic file writes: a temp file in the target's directory, fsynced, then renamed over the target.

A crash at any moment leaves either the previous file or the whole new one, never a part (rename is atomic on
POSIX within one filesystem, which the temp file shares with its target by living in the same directory).
"""
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import OmegaConf


class AtomicFile:
    """A binary file written under a temp name beside `path`; `commit()` renames it into place, `abort()` drops it.

    For writers that stream over many calls (a latent shard); one-shot writes use the functions below. `tmp_name`
    lets a caller choose the temp name (e.g. to record it, so another process can clean up after a crash).
    """

    def __init__(self, path: str | os.PathLike, tmp_name: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(tmp_name or f".{self.path.name}.tmp-{uuid.uuid4().hex}")
        self.file: IO[bytes] = open(self.tmp, "wb")

    def sync(self) -> None:
        """Flush, fsync and close the temp file (its content is then final; `tmp` may be read)."""
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def commit(self, exclusive: bool = False) -> bool:
        """Sync, then rename over `path`; with `exclusive`, link instead and return False if `path` already exists
        (os.link never overwrites, so of several concurrent writers exactly one wins)."""
        try:
            self.sync()
            if not exclusive:
                os.replace(self.tmp, self.path)
                return True
            try:
                os.link(self.tmp, self.path)
            except FileExistsError:
                return False
            return True
        finally:
            self.tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        """Close and delete the temp file; `path` is untouched."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], exclusive: bool = False) -> bool:
    """Atomic write (temp file + fsync + rename) of whatever `write(file)` puts in a binary file object."""
    out = AtomicFile(path)
    try:
        write(out.file)
    except BaseException:
        out.abort()
        raise
    return out.commit(exclusive)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, exclusive: bool = False) -> bool:
    """Atomic write (temp file + fsync + rename) of bytes."""
    return atomic_write(path, lambda f: f.write(data), exclusive)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic write (temp file + fsync + rename) of UTF-8 text."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(
    path: str | os.PathLike, obj: Any, indent: int = 2, sort_keys: bool = False, exclusive: bool = False
) -> bool:
    """Atomic write (temp file + fsync + rename) of `obj` as JSON; see AtomicFile.commit for `exclusive`."""
    return atomic_write_bytes(path, json.dumps(obj, indent=indent, sort_keys=sort_keys).encode(), exclusive)


def atomic_write_yaml(path: str | os.PathLike, cfg: Any) -> None:
    """Atomic write (temp file + fsync + rename) of a config (DictConfig or plain dict/list) as resolved YAML."""
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Atomic torch.save (temp file + fsync + rename): a kill leaves the previous checkpoint whole."""
    atomic_write(path, lambda f: torch.save(obj, f))
