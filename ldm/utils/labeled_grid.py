"""Paper-ready grids: tiles with row and column labels drawn on one picture (PNG, optionally PDF)."""
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ldm.utils.atomic import atomic_write
from ldm.utils.images import to_uint8


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def labeled_grid(
    tiles: torch.Tensor, row_labels: list[str], col_labels: list[str], *, scale: int = 1, pad: int = 4
) -> Image.Image:
    """tiles [rows, cols, 3, H, W] in [-1, 1] -> a white sheet with wrapped row labels left, column labels on top."""
    rows, cols, _, h, w = tiles.shape
    if len(row_labels) != rows or len(col_labels) != cols:
        raise ValueError(f"need {rows} row and {cols} column labels, got {len(row_labels)} and {len(col_labels)}")
    h, w = h * scale, w * scale
    font_size = max(10, min(h // 4, 18))
    font = _font(font_size)
    wrap = max(8, int(2.2 * w / font_size))
    row_text = [textwrap.fill(t, width=wrap) for t in row_labels]
    col_text = [textwrap.fill(t, width=max(6, int(1.6 * w / font_size))) for t in col_labels]
    line = font_size + 2
    left = max(w * 2, 40) if any(row_labels) else 0
    top = line * max((t.count("\n") + 1 for t in col_text), default=0) + pad if any(col_labels) else 0
    sheet = Image.new("RGB", (left + cols * (w + pad) + pad, top + rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    pixels = to_uint8(tiles.cpu()).permute(0, 1, 3, 4, 2).numpy()  # [rows, cols, H, W, 3]
    for r in range(rows):
        y = top + pad + r * (h + pad)
        draw.multiline_text((pad, y), row_text[r], fill="black", font=font, spacing=2)
        for c in range(cols):
            tile = Image.fromarray(pixels[r, c]).resize((w, h), Image.NEAREST)
            sheet.paste(tile, (left + pad + c * (w + pad), y))
    for c in range(cols):
        draw.multiline_text((left + pad + c * (w + pad), pad // 2), col_text[c], fill="black", font=font, spacing=2)
    return sheet


def save_grid(sheet: Image.Image, path: str | Path, pdf: bool = False) -> list[Path]:
    """Write the sheet as PNG (and PDF next to it when asked)."""
    path = Path(path)
    atomic_write(path, lambda f: sheet.save(f, format="PNG"))
    written = [path]
    if pdf:
        atomic_write(path.with_suffix(".pdf"), lambda f: sheet.save(f, "PDF", resolution=150))
        written.append(path.with_suffix(".pdf"))
    return written
