"""Any folder of images (searched recursively), with optional captions from .txt files or captions.jsonl."""

import json
from pathlib import Path

from torch.utils.data import Dataset

from ldm.data.skips import SkipCounter
from ldm.data.transforms import CROPS, load_rgb, prepare_image

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
    """Images under `root`, square-cropped and resized; corrupt files are skipped (counted, logged), never fatal.

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
        # a corrupt file is replaced by the next readable one, so a bad image costs a log line, not the run
        for offset in range(len(self.files)):
            file = self.files[(index + offset) % len(self.files)]
            try:
                img = load_rgb(self.root / file)
            except Exception as err:  # PIL raises many types for bad files (OSError, SyntaxError, ValueError...)
                self.skipped.add(file.as_posix(), err)
                continue
            return {
                "image": prepare_image(img, self.resolution, self.crop, self.flip),
                "caption": self.caption(file),
                "label": self.label(file),
                "key": file.with_suffix("").as_posix(),
            }
        raise RuntimeError(f"none of the {len(self.files)} images under {str(self.root)!r} could be read")
