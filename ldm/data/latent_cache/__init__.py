"""The latent cache: a frozen first stage's posteriors of a dataset in verified webdataset tar shards.

One cache directory per split:

    plan.json              what is cached (first stage, source, shard size, shapes); a re-run must match it
    shard-000000.tar       records `{index:09d}.{json,mean.npy,std.npy[,flip.mean.npy,flip.std.npy],crc32}`
    shard-000000.json      sidecar: sample count, sha256, bytes, skipped inputs (and counts per reason), exact latent
                           sums, the index of its records
    claims/shard-000000.G  the claim (owner record) of generation G while one process writes that shard
    manifest.json          written once, atomically, after every shard is complete

Dataset index i goes to shard i // samples_per_shard, so every process agrees on the layout. A stream of tar
shards (webdataset / img2dataset) has no length: input shard s becomes latent shard s, its j-th sample record
s * STREAM_SHARD_SLOTS + j (plan num_inputs null), and each sidecar counts its skipped samples per reason.
Shards are written to a temp file and renamed, so a kill never leaves a broken shard under its final name, and the
manifest only exists once all shards do.

Format v2 adds the `crc32` member: 8 hex digits of the crc32 of the record's other members, in order, checked on
every read. The reader refuses a v1 cache (no checksums) with a message to re-run task=cache_latents rather
than read it unchecked: caches are cheap to rebuild next to training, and one read path stays simple.

Files, one idea each: format (names, layout), manifest (plan and manifest), claims (work split between
processes), inputs (checked dataset items), writer (one shard), encode (the loop, cache_latents), verify
(sha256 and crc32), tar_index and reader (LatentDataset, normalising with ldm/data/latent_norm.py); for streams,
stream (the loop, cache_stream_latents), with ldm/data/tar_samples.py and ldm/data/preprocess.py.

Each sidecar holds an index of its shard (each record's position and json size; tar_index.py), so the reader
starts in O(shards), never scanning the tars; a cache written before the index is scanned instead.

A stream cache made with aspect-ratio buckets (Preprocess.buckets, ldm/data/buckets.py) records the buckets and each
bucket's latent shape in its plan, each record's bucket in its json and in its sidecar's index, and the count per bucket
in each sidecar and the manifest; without buckets none of these keys exist, so such caches are byte-identical to before.
"""
from ldm.data.latent_cache.encode import CacheResult, cache_latents
from ldm.data.latent_cache.manifest import read_manifest
from ldm.data.latent_cache.reader import LatentDataset

__all__ = ["CacheResult", "LatentDataset", "cache_latents", "read_manifest"]
