"""Content hashes of files and checkpoint directories (what a file holds, not its name, size or mtime)."""
import hashlib
from pathlib import Path

CHUNK_BYTES = 1 << 22


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_path(path: str | Path) -> str:
    """SHA-256 of a file, or of a directory's files (relative names and contents, in sorted order): a sharded
    checkpoint directory hashes the same wherever it lies."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()
