"""eval=reference: samples for the prompts of a text file scored against a folder of real images with FID, KID,
Inception Score, precision/recall and (when a CLIP model is configured) CLIP score; reference statistics cached."""
import hashlib
from pathlib import Path

import numpy as np
import torch

from ldm.data.image_folder import ImageFolderDataset
from ldm.eval.clip_score import CLIPScore
from ldm.eval.frechet import feature_stats, frechet_distance, frechet_distance_features, kid, real_floor
from ldm.eval.inception import InceptionFeatures, extract_features
from ldm.eval.inception_score import inception_score
from ldm.eval.precision_recall import precision_recall
from ldm.eval.reference_stats import ReferenceStats, reference_stats
from ldm.utils.errors import ConfigError, missing_file
from ldm.utils.hashing import sha256_file

CROP = "center"  # reference images: centre square crop, PIL bicubic (antialiased) resize to the samples' resolution


def read_prompts(path: str | Path, n: int) -> list[str]:
    """The first n lines of a UTF-8 text file, one prompt per line."""
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


def folder_hash(dataset: ImageFolderDataset) -> str:
    """SHA-256 over the reference images' relative names and bytes, and how they are cropped and resized."""
    digest = hashlib.sha256(f"{CROP}-crop bicubic {dataset.resolution}px\n".encode())
    for file in dataset.files:
        digest.update(f"{file.as_posix()}\0{sha256_file(dataset.root / file)}\n".encode())
    return digest.hexdigest()


class ReferenceSuite:
    """FID and KID (Inception pool3) against a reference folder's cached statistics, Inception Score and improved
    precision/recall (k-NN balls on the same features) of the samples, mean CLIP score against their prompts.

    Sample i is drawn for prompt i of `prompts_file`; `num_samples` (n) prompts are used. Reference images are
    centre-cropped and resized to `resolution`, the samples' size, then fed to Inception as the samples are.
    """

    name = "reference"
    fid_metric, alignment_metric = "fid", "clip_score"  # the axes of task=evaluate's sweep plots

    def __init__(
        self,
        *,
        prompts_file: str,
        reference_dir: str,
        inception: InceptionFeatures,
        stats_dir: str,
        num_samples: int = 1000,
        resolution: int = 256,
        clip: CLIPScore | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        pr_k: int = 3,
        is_splits: int = 10,
        batch_size: int = 50,
        seed: int = 2020,
    ):
        if num_samples <= pr_k:
            raise ConfigError(f"eval.num_samples={num_samples} must exceed eval.pr_k={pr_k} (precision/recall)")
        self.prompts = read_prompts(prompts_file, num_samples)
        if not Path(reference_dir).is_dir():
            raise missing_file(str(reference_dir), "eval.reference_dir", "reference image folder")
        self.reference = ImageFolderDataset(reference_dir, resolution=resolution, crop=CROP, on_corrupt="raise")
        if len(self.reference) <= pr_k:
            raise ConfigError(f"eval.reference_dir={reference_dir} holds {len(self.reference)} images; precision/"
                              f"recall needs more than eval.pr_k={pr_k}")
        self.inception, self.clip, self.stats_dir = inception, clip, stats_dir
        self.kid_subsets, self.kid_subset_size, self.pr_k = kid_subsets, kid_subset_size, pr_k
        self.is_splits = is_splits
        self.batch_size, self.seed = batch_size, seed
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._ref: ReferenceStats | None = None
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
        for start in range(0, len(self.reference), self.batch_size):
            stop = min(start + self.batch_size, len(self.reference))
            yield torch.stack([self.reference[i]["image"] for i in range(start, stop)])

    def _reference_features(self) -> np.ndarray:
        self.inception.to(self.device)
        return extract_features(self.inception, self._reference_batches(), self.device).numpy()

    def reference_hash(self) -> str:
        if self._ref_hash is None:  # reads every reference image once per suite
            self._ref_hash = folder_hash(self.reference)
        return self._ref_hash

    def reference_stats(self) -> ReferenceStats:
        """The reference set's features and Gaussian, from the cache when extractor, images and resize match."""
        if self._ref is None:
            key = dict(feature_extractor=self.inception.name, reference_hash=self.reference_hash(),
                       resize=self.inception.resize)
            self._ref, _ = reference_stats(self._reference_features, cache_dir=self.stats_dir, key=key)
        return self._ref

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
        return out

    def floor(self) -> dict[str, float]:
        """FID, KID and precision/recall between two disjoint random halves of the reference set, n images each
        (n = min(num_samples, half the set)): what a model that draws real images scores at that n."""
        ref = self.reference_stats()
        n = min(len(self.prompts), ref.n // 2)
        if n <= self.pr_k:
            return {}
        floor = real_floor(ref.features, n, kid_subsets=self.kid_subsets, kid_subset_size=min(self.kid_subset_size, n),
                           seed=self.seed)
        perm = np.random.RandomState(self.seed).permutation(ref.n)  # the halves real_floor draws
        floor.update(precision_recall(ref.features[perm[:n]], ref.features[perm[n : 2 * n]], k=self.pr_k))
        return floor

    def protocol(self) -> dict[str, str | int]:
        """What decides these numbers besides the samples: recorded with every result row."""
        return dict(reference_hash=self.reference_hash()[:16], n_reference=len(self.reference),
                    feature_extractor=self.inception.name, resize=self.inception.resize,
                    reference_crop=f"{CROP}-bicubic-{self.reference.resolution}",
                    kid_subsets=self.kid_subsets, kid_subset_size=self.kid_subset_size, pr_k=self.pr_k,
                    extractor_clip=self.clip.name if self.clip is not None else "none")
