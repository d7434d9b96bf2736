"""Test helpers for tar shards and caching faults: img2dataset-layout shards, optionally cut short, and a first
stage that dies mid-run."""
import io
import tarfile
from pathlib import Path

import torch


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]], cut_last: bool = False) -> None:
    """img2dataset layout: each sample's members in the given order (a truncated image leaves a partial sample);
    `cut_last`: a transfer that stopped early, inside the last member."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if cut_last:
        with tarfile.open(path) as tar:
            last = tar.getmembers()[-1]
        path.write_bytes(path.read_bytes()[: last.offset_data + last.size // 2])


class FailingEncoder(torch.nn.Module):
    """The first stage, but encode() dies on its n-th call: a crash in the middle of a shard."""

    def __init__(self, first_stage, fail_on_call: int):
        super().__init__()
        self.first_stage, self.calls, self.fail_on_call = first_stage, 0, fail_on_call

    def encode(self, x):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        return self.first_stage.encode(x)
