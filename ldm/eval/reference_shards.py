"""eval.reference_dir as webdataset shards: the real images (and captions) of local tar shards in the img2dataset
layout (ldm/data/tar_samples.py), in the order listed (a brace pattern expands in order) and, within a shard, in tar
order; each image centre-cropped and resized as a reference folder's are (ldm/data/preprocess.py).

A damaged or unusable sample is an error naming it, never a skip: the reference set decides every number, and a
skipped sample would change it silently.
"""
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import webdataset as wds

from ldm.data.preprocess import Preprocess, caption_of, prepare_sample
from ldm.data.skips import is_skipped
from ldm.data.tar_samples import tar_samples
from ldm.data.transforms import uint8_to_tensor
from ldm.utils.errors import ConfigError, CorruptDataError, missing_file
from ldm.utils.hashing import sha256_file

KEY = "eval.reference_dir"


def is_shard_spec(spec: str | Sequence[str]) -> bool:
    """Whether eval.reference_dir names tar shards (a list, a brace pattern, `::`-joined patterns, a .tar path)
    rather than a folder of images."""
    if not isinstance(spec, str):
        return True
    return spec.endswith(".tar") or "{" in spec or "::" in spec


def local_shards(spec: str | Sequence[str]) -> list[str]:
    """The shard paths of a brace pattern or list; each must be an existing local file (its bytes are hashed for
    the statistics cache, so a stream that may change is refused)."""
    shards = wds.shardlists.expand_urls(spec) if isinstance(spec, str) else [str(s) for s in spec]
    if not shards:
        raise ConfigError(f"{KEY}={spec!r} names no shards")
    remote = [s for s in shards if "://" in s or s.startswith("pipe:")]
    if remote:
        raise ConfigError(f"{KEY}: reference shards must be local .tar files (their bytes key the cached "
                          f"statistics), got {remote[0]!r}")
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise missing_file(missing[0], KEY, f"reference shard ({len(missing)} of {len(shards)} missing)")
    return shards


class ShardReference:
    """Real images from local tar shards, `resolution` px squares; `captions[i]` is sample i's caption ("" if none,
    None if unreadable)."""

    def __init__(self, spec: str | Sequence[str], resolution: int):
        self.shards, self.resolution = local_shards(spec), resolution
        self.preprocess = Preprocess(resolution, empty_caption="keep")
        self.keys, self.captions = [], []
        for _, sample in self._samples():  # one pass without decoding: the count, the captions, any damage
            self.keys.append(sample["__key__"])
            try:
                self.captions.append(caption_of(sample) or "")
            except (UnicodeDecodeError, ValueError):  # json.JSONDecodeError is a ValueError
                self.captions.append(None)
        if not self.keys:
            raise ConfigError(f"{KEY}: the shards {self.shards[0]!r}... hold no samples")

    def __len__(self) -> int:
        return len(self.keys)

    def _samples(self) -> Iterator[tuple[str, dict]]:
        for shard in self.shards:
            with open(shard, "rb") as stream:
                for sample in tar_samples(stream, shard):
                    if "__error__" in sample:
                        raise CorruptDataError(f"reference shard damaged: {sample['__error__']}; fix or remove it "
                                               f"from {KEY}")
                    yield shard, sample

    def images(self) -> Iterator[torch.Tensor]:
        """The images, float32 [3, resolution, resolution] in [-1, 1], one at a time in the set's order."""
        for shard, sample in self._samples():
            prepared = prepare_sample(sample, self.preprocess)
            if is_skipped(prepared):
                raise CorruptDataError(f"reference shard {shard!r}, sample {prepared['key']!r}: {prepared['skip']} "
                                       f"({prepared['message']}); the reference set is used whole: fix or remove it")
            yield uint8_to_tensor(prepared["pixels"])

    def content_hash(self) -> str:
        """SHA-256 over the shards' file names and bytes, in order, and how their images are cropped and resized."""
        digest = hashlib.sha256(f"shards center-crop bicubic {self.resolution}px\n".encode())
        for shard in self.shards:
            digest.update(f"{Path(shard).name}\0{sha256_file(shard)}\n".encode())
        return digest.hexdigest()
