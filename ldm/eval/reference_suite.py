"""eval=reference: samples for the prompts of a text file (or the reference set's captions) scored against real
images (a folder, or webdataset shards) with FID, KID, Inception Score, precision/recall, and when configured CLIP
score and FD_DINOv2; reference statistics cached per feature extractor."""
import hashlib
from pathlib import Path

import numpy as np
import torch

from ldm.data.image_folder import ImageFolderDataset
from ldm.eval.clip_score import CLIPScore
from ldm.eval.dinov2 import DINOv2Features
from ldm.eval.frechet import feature_stats, frechet_distance, frechet_distance_features, kid, real_floor
from ldm.eval.inception import InceptionFeatures, extract_features
from ldm.eval.inception_score import inception_score
from ldm.eval.precision_recall import precision_recall
from ldm.eval.reference_shards import ShardReference, is_shard_spec
from ldm.eval.reference_stats import ReferenceStats, reference_stats
from ldm.utils.errors import ConfigError, missing_file
from ldm.utils.hashing import sha256_file

CROP = "center"  # reference images: centre square crop, PIL bicubic (antialiased) resize to the samples' resolution
PROMPTS_FROM = ("file", "reference")


def read_prompts(path: str | Path | None, n: int) -> list[str]:
    """The first n lines of a UTF-8 text file, one prompt per line."""
    if path is None:
        raise ConfigError("eval.prompts_file is not set: a UTF-8 text file, one prompt per line (or "
                          "eval.prompts_from=reference for the reference set's captions)")
    path = Path(path)
    if not path.is_file():
        raise missing_file(str(path), "eval.prompts_file", "prompts file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) < n:
        raise ConfigError(f"{path} holds {len(lines)} prompts, fewer than eval.num_samples={n}")
    blank = next((i for i, line in enumerate(lines[:n]) if not line.strip()), None)
    if blank is not None:
        raise ConfigError(f"{path}:{blank + 1}: empty prompt (eval.prompts_file takes one prompt per line)")
    return lines[:n]


def reference_prompts(reference: ImageFolderDataset | ShardReference, n: int) -> list[str]:
    """The captions of the first n reference images (shards: txt/json members; a folder: .txt sidecars or
    captions.jsonl), so that sample i is drawn for the caption of real image i."""
    if len(reference) < n:
        raise ConfigError(f"eval.prompts_from=reference: the reference set holds {len(reference)} images, fewer than "
                          f"eval.num_samples={n}")
    if isinstance(reference, ShardReference):
        keys, captions = reference.keys[:n], reference.captions[:n]
    else:
        keys = [f.as_posix() for f in reference.files[:n]]
        captions = [reference.caption(f) for f in reference.files[:n]]
    bad = next((i for i, caption in enumerate(captions) if not caption), None)
    if bad is not None:
        raise ConfigError(f"eval.prompts_from=reference: reference image {keys[bad]!r} has no readable caption")
    return captions


def folder_hash(dataset: ImageFolderDataset) -> str:
    """SHA-256 over the reference images' relative names and bytes, and how they are cropped and resized."""
    digest = hashlib.sha256(f"{CROP}-crop bicubic {dataset.resolution}px\n".encode())
    for file in dataset.files:
        digest.update(f"{file.as_posix()}\0{sha256_file(dataset.root / file)}\n".encode())
    return digest.hexdigest()


class ReferenceSuite:
    """FID and KID (Inception pool3) against a reference set's cached statistics, Inception Score and improved
    precision/recall (k-NN balls on the same features) of the samples, mean CLIP score against their prompts, and
    with `dinov2` FD_DINOv2 (Stein et al. 2023: the Frechet distance on DINOv2 features, its own cached statistics).

    `reference_dir`: a folder of images, or local webdataset tar shards (a brace pattern or a list). Sample i is drawn
    for prompt i of `prompts_file` (prompts_from="file") or for the caption of reference image i ("reference");
    `num_samples` (n) prompts are used. Reference images are centre-cropped and resized to `resolution`, the
    samples' size, then fed to each feature extractor as the samples are.
    """

    name = "reference"
    fid_metric, alignment_metric = "fid", "clip_score"  # the axes of task=evaluate's sweep plots

    def __init__(
        self,
        *,
        reference_dir: str | list[str],
        inception: InceptionFeatures,
        stats_dir: str,
        prompts_file: str | None = None,
        prompts_from: str = "file",
        num_samples: int = 1000,
        resolution: int = 256,
        clip: CLIPScore | None = None,
        dinov2: DINOv2Features | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        pr_k: int = 3,
        is_splits: int = 10,
        batch_size: int = 50,
        seed: int = 2020,
    ):
        if num_samples <= pr_k:
            raise ConfigError(f"eval.num_samples={num_samples} must exceed eval.pr_k={pr_k} (precision/recall)")
        if prompts_from not in PROMPTS_FROM:
            raise ConfigError(f"eval.prompts_from={prompts_from!r}: expected one of {PROMPTS_FROM}")
        if prompts_from == "file":  # a missing prompts file fails before the reference set is read
            self.prompts = read_prompts(prompts_file, num_samples)
        if is_shard_spec(reference_dir):
            self.reference = ShardReference(reference_dir, resolution)
        elif not Path(reference_dir).is_dir():
            raise missing_file(str(reference_dir), "eval.reference_dir", "reference image folder (or .tar shards)")
        else:
            self.reference = ImageFolderDataset(reference_dir, resolution=resolution, crop=CROP, on_corrupt="raise")
        if len(self.reference) <= pr_k:
            raise ConfigError(f"eval.reference_dir={reference_dir} holds {len(self.reference)} images; precision/"
                              f"recall needs more than eval.pr_k={pr_k}")
        if prompts_from == "reference":
            self.prompts = reference_prompts(self.reference, num_samples)
        self.prompts_from = prompts_from
        self.inception, self.clip, self.dinov2, self.stats_dir = inception, clip, dinov2, stats_dir
        self.kid_subsets, self.kid_subset_size, self.pr_k = kid_subsets, kid_subset_size, pr_k
        self.is_splits = is_splits
        self.batch_size, self.seed = batch_size, seed
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._stats: dict[str, ReferenceStats] = {}  # by feature extractor name
        self._ref_hash: str | None = None

    def conditions(self) -> tuple[list[str] | None, list[int] | None]:
        return self.prompts, None

    def _features(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Pool3 features [N, 2048] and logits [N, 1008] of images [N, 3, H, W] in [-1, 1], in batches."""
        self.inception.to(self.device)
        out = [self.inception.pool_and_logits(b.to(self.device)) for b in images.split(self.batch_size)]
        return torch.cat([o[0].cpu() for o in out]).numpy(), torch.cat([o[1].cpu() for o in out]).numpy()

    def _reference_batches(self):
        """Reference images [B, 3, H, W] in [-1, 1], a batch at a time (a large set never sits in memory whole)."""
        if isinstance(self.reference, ShardReference):
            images = self.reference.images()
        else:
            images = (self.reference[i]["image"] for i in range(len(self.reference)))
        batch = []
        for image in images:
            batch.append(image)
            if len(batch) == self.batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)

    def reference_hash(self) -> str:
        if self._ref_hash is None:  # reads every reference image once per suite
            shards = isinstance(self.reference, ShardReference)
            self._ref_hash = self.reference.content_hash() if shards else folder_hash(self.reference)
        return self._ref_hash

    def reference_stats(self, extractor: torch.nn.Module | None = None) -> ReferenceStats:
        """The reference set's features and Gaussian under `extractor` (Inception by default), from the cache when
        extractor (name with weights hash), images and resize match."""
        extractor = self.inception if extractor is None else extractor
        if extractor.name not in self._stats:
            def compute() -> np.ndarray:
                extractor.to(self.device)
                return extract_features(extractor, self._reference_batches(), self.device).numpy()

            key = dict(feature_extractor=extractor.name, reference_hash=self.reference_hash(), resize=extractor.resize)
            self._stats[extractor.name], _ = reference_stats(compute, cache_dir=self.stats_dir, key=key)
        return self._stats[extractor.name]

    def _fid(self, feats: np.ndarray, ref: ReferenceStats) -> float:
        """From the cached Gaussian, or (same number, faster) from the features when either set has fewer than D."""
        if min(len(feats), ref.n) < feats.shape[1]:
            return frechet_distance_features(feats, ref.features)
        return frechet_distance(*feature_stats(feats), ref.mu, ref.sigma)

    def score(self, images: torch.Tensor) -> dict[str, float]:
        """Scores images generated for the first len(images) prompts (all of them for task=evaluate)."""
        if len(images) <= self.pr_k or len(images) > len(self.prompts):
            raise ValueError(f"score needs {self.pr_k + 1}..{len(self.prompts)} images, got {len(images)}")
        ref = self.reference_stats()
        feats, logits = self._features(images)
        subset = min(self.kid_subset_size, len(feats), ref.n)
        kid_mean, kid_std = kid(feats, ref.features, subsets=self.kid_subsets, subset_size=subset, seed=self.seed)
        out = dict(fid=self._fid(feats, ref), kid=kid_mean, kid_std=kid_std,
                   **precision_recall(ref.features, feats, k=self.pr_k))
        out["is"], out["is_std"] = inception_score(logits, splits=min(self.is_splits, len(images)), seed=self.seed)
        if self.clip is not None:
            self.clip.to(self.device)
            b = self.batch_size
            clip = [self.clip(images[i : i + b].to(self.device), self.prompts[i : i + b]).cpu()
                    for i in range(0, len(images), b)]
            out["clip_score"] = torch.cat(clip).mean().item()  # sample i against prompt i
        if self.dinov2 is not None:
            self.dinov2.to(self.device)
            dino = extract_features(self.dinov2, images.split(self.batch_size), self.device).numpy()
            out["fd_dinov2"] = self._fid(dino, self.reference_stats(self.dinov2))
        return out

    def floor(self, transform=None) -> dict[str, float]:
        """FID, KID and precision/recall between two disjoint random halves of the reference set, n images each
        (n = min(num_samples, half the set)): what a model that draws real images scores at that n. With a
        `transform`, {}: the reference set is kept as features, so there are no images to transform."""
        if transform is not None:
            return {}
        ref = self.reference_stats()
        n = min(len(self.prompts), ref.n // 2)
        if n <= self.pr_k:
            return {}
        floor = real_floor(ref.features, n, kid_subsets=self.kid_subsets, kid_subset_size=min(self.kid_subset_size, n),
                           seed=self.seed)
        perm = np.random.RandomState(self.seed).permutation(ref.n)  # the halves real_floor draws
        floor.update(precision_recall(ref.features[perm[:n]], ref.features[perm[n : 2 * n]], k=self.pr_k))
        if self.dinov2 is not None:  # the same halves, in DINOv2's features
            dino = self.reference_stats(self.dinov2).features
            floor["fd_dinov2"] = frechet_distance_features(dino[perm[:n]], dino[perm[n : 2 * n]])
        return floor

    def protocol(self) -> dict[str, str | int]:
        """What decides these numbers besides the samples: recorded with every result row."""
        return dict(reference_hash=self.reference_hash()[:16], n_reference=len(self.reference),
                    feature_extractor=self.inception.name, resize=self.inception.resize,
                    reference_crop=f"{CROP}-bicubic-{self.reference.resolution}",
                    kid_subsets=self.kid_subsets, kid_subset_size=self.kid_subset_size, pr_k=self.pr_k,
                    extractor_clip=self.clip.name if self.clip is not None else "none",
                    prompts_from=self.prompts_from,
                    # FD_DINOv2: "none" when eval.dinov2.weights_path is null (skipped)
                    extractor_dinov2=self.dinov2.name if self.dinov2 is not None else "none",
                    resize_dinov2=self.dinov2.resize if self.dinov2 is not None else "none")
