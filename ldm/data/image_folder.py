"""Any folder of images (searched recursively), with optional captions from .txt files or captions.jsonl."""

import json
from pathlib import Path

from torch.utils.data import Dataset

from ldm.data.skips import SkipCounter, check_on_corrupt, skipped_item
from ldm.data.transforms import CROPS, load_rgb, prepare_image
from ldm.utils.errors import CorruptDataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTIONS_FILE = "captions.jsonl"


def read_captions_jsonl(path: Path) -> dict[str, str]:
    """{"file": path relative to the root, "caption": text} per line -> {relative posix path: caption}."""
    captions = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                captions[Path(record["file"]).as_posix()] = str(record["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                expected = '{"file": ..., "caption": ...}'
                raise ValueError(f"{path}:{number}: expected {expected}, got {line.strip()!r}") from err
    return captions


class ImageFolderDataset(Dataset):
    """Images under `root`, square-cropped and resized; a corrupt file is a counted, logged skip (a marker, see
    ldm/data/skips.py; never a substitute image), or with on_corrupt="raise" a one-line error naming it.

    Caption of `a/b.jpg`: the text of `a/b.txt` if present, else its entry in `root/captions.jsonl`, else "".
    With `labels_from_subfolders`, the label is the index of the image's top-level folder in sorted order.
    """

    def __init__(
        self,
        root: str,
        resolution: int = 256,
        crop: str = "center",
        flip: bool = False,
        labels_from_subfolders: bool = False,
        on_corrupt: str = "skip",
    ):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist; set data.root=/path/to/images")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        self.files = sorted(
            p.relative_to(self.root) for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.files:
            suffixes = ", ".join(IMAGE_SUFFIXES)
            raise FileNotFoundError(f"no images ({suffixes}) found under {str(self.root)!r}; check data.root")
        jsonl = self.root / CAPTIONS_FILE
        self.jsonl_captions = read_captions_jsonl(jsonl) if jsonl.is_file() else {}
        subfolders = {f.parts[0] for f in self.files if len(f.parts) > 1}
        self.classes = tuple(sorted(subfolders)) if labels_from_subfolders else ()
        if labels_from_subfolders and not self.classes:
            raise ValueError(f"labels_from_subfolders=True but {str(self.root)!r} has no subfolders with images")
        self.resolution, self.crop, self.flip = resolution, crop, flip
        self.on_corrupt = check_on_corrupt(on_corrupt, "data.<split>.on_corrupt")
        self.skipped = SkipCounter("image")

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_skipped(self) -> int:
        """Loads of corrupt images skipped so far, summed over DataLoader workers."""
        return self.skipped.count

    def caption(self, file: Path) -> str:
        sidecar = (self.root / file).with_suffix(".txt")
        if sidecar.is_file():
            return sidecar.read_text(encoding="utf-8").strip()
        return self.jsonl_captions.get(file.as_posix(), "")

    def label(self, file: Path) -> int:
        if not self.classes:
            return -1
        return self.classes.index(file.parts[0]) if len(file.parts) > 1 else -1

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} out of range for {len(self.files)} images")
        file = self.files[index]
        try:
            img = load_rgb(self.root / file)
        except Exception as err:  # PIL raises many types for bad files (OSError, SyntaxError, ValueError...)
            return self._corrupt(file, err)
        return {
            "image": prepare_image(img, self.resolution, self.crop, self.flip),
            "caption": self.caption(file),
            "label": self.label(file),
            "key": file.with_suffix("").as_posix(),
        }

    def _corrupt(self, file: Path, err: Exception) -> dict:
        """Raise naming the file, or count it and return a skip marker (whatever the mode, never another image)."""
        message = " ".join(str(err).split())  # one line
        if self.on_corrupt == "raise":
            raise CorruptDataError(
                f"corrupt image {str(self.root / file)!r} ({type(err).__name__}: {message}): remove or replace it, "
                "or set on_corrupt=skip (e.g. data.train.on_corrupt=skip) to skip and count such files"
            ) from err
        self.skipped.add(file.as_posix(), err)
        return skipped_item(file.as_posix(), f"unreadable image: {type(err).__name__}", message[:500])
