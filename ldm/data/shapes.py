"""Shapes: a procedural text-to-image benchmark of coloured shapes with exact captions and attributes.

Each scene has 1 or 2 non-overlapping objects on black. Every attribute is a small vocabulary, so a
generated image can be scored by measuring colour, size and position (see tests/test_data_shapes.py).
Scenes depend only on (seed, index), not on the resolution: the same scene renders at 32 or 64 px.
"""

from dataclasses import dataclass
from itertools import combinations

import einops
import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data.transforms import uint8_to_tensor

COLORS = ("red", "green", "blue", "yellow", "purple", "white")
COLOR_RGB = ((230, 25, 25), (25, 200, 25), (25, 60, 230), (240, 220, 20), (160, 40, 220), (240, 240, 240))
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
SIZE_DIAMETER = (0.25, 0.45)  # d, as a fraction of the image side
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
POSITION_XY = ((0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73), (0.5, 0.5))  # object centre (x, y), y down
VOCABULARIES = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}

SIZE_JITTER = 0.05  # relative jitter of d
POSITION_JITTER = 0.03  # absolute jitter of the centre, fraction of the side
SUPERSAMPLE = 4  # render at 4x and box-filter down: anti-aliased edges
MAX_PLACEMENT_TRIES = 1000
LAYOUT_CLASSES = 1 + len(COLORS)  # semantic map classes: background, then one per colour (render_layout)

# Colour x shape x position triples never drawn for training (`combinations="seen"`) and kept for evaluation
# (`combinations="held_out"`): does the model compose the grammar or memorise the scenes? Every colour, shape and
# position, and every pair of them, is still seen in training; only these 10 of the 90 triples are new.
HELD_OUT = frozenset({
    ("red", "circle", "top right"), ("red", "triangle", "bottom left"), ("green", "square", "center"),
    ("blue", "circle", "bottom right"), ("blue", "square", "top left"), ("yellow", "triangle", "top left"),
    ("purple", "square", "bottom left"), ("purple", "circle", "center"), ("white", "triangle", "top right"),
    ("white", "square", "bottom right"),
})
COMBINATIONS = ("all", "seen", "held_out")


@dataclass(frozen=True)
class ShapeObject:
    """One object: vocabulary indices plus its exact geometry in fractions of the image side."""

    color: int
    shape: int
    size: int
    position: int
    diameter: float  # d: circle diameter, square side, triangle base and height
    x: float  # centre of the bounding box
    y: float

    def box(self) -> tuple[float, float, float, float]:
        r = self.diameter / 2
        return self.x - r, self.y - r, self.x + r, self.y + r

    @property
    def held_out(self) -> bool:
        return (COLORS[self.color], SHAPES[self.shape], POSITIONS[self.position]) in HELD_OUT

    def phrase(self) -> str:
        return f"a {SIZES[self.size]} {COLORS[self.color]} {SHAPES[self.shape]} in the {POSITIONS[self.position]}"


def _overlap(a: ShapeObject, b: ShapeObject) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1


def sample_attributes(rng: np.random.Generator, num_objects: int = 1, combinations: str = "all") -> list[ShapeObject]:
    """Draw a scene: attributes, jittered sizes, then distinct positions redrawn until boxes are disjoint; with
    combinations="seen" / "held_out", the whole scene is redrawn until no / every object's triple is in HELD_OUT."""
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects}")
    if combinations not in COMBINATIONS:
        raise ValueError(f"combinations must be one of {COMBINATIONS}, got {combinations!r}")
    while True:  # redraw whole scenes: "seen" keeps 89% of them, "held_out" 11% (1.2% with two objects)
        objects = _scene(rng, num_objects)
        held = [obj.held_out for obj in objects]
        if combinations == "all" or (all(held) if combinations == "held_out" else not any(held)):
            return objects


def _scene(rng: np.random.Generator, num_objects: int) -> list[ShapeObject]:
    colors = rng.integers(len(COLORS), size=num_objects)
    shapes = rng.integers(len(SHAPES), size=num_objects)
    sizes = rng.integers(len(SIZES), size=num_objects)
    diameters = np.take(SIZE_DIAMETER, sizes) * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER, num_objects))
    for _ in range(MAX_PLACEMENT_TRIES):
        positions = rng.choice(len(POSITIONS), size=num_objects, replace=False)
        jitter = rng.uniform(-POSITION_JITTER, POSITION_JITTER, (num_objects, 2))
        centres = np.take(POSITION_XY, positions, axis=0) + jitter
        objects = [
            ShapeObject(int(c), int(s), int(z), int(p), float(d), float(x), float(y))
            for c, s, z, p, d, (x, y) in zip(colors, shapes, sizes, positions, diameters, centres)
        ]
        if not any(_overlap(a, b) for a, b in combinations(objects, 2)):
            return objects
    raise RuntimeError(f"no non-overlapping placement found in {MAX_PLACEMENT_TRIES} tries")  # unreachable in practice


def describe(objects: list[ShapeObject]) -> str:
    """Caption: one phrase per object joined by ' and ', e.g. 'a small red circle in the top left'."""
    return " and ".join(obj.phrase() for obj in objects)


def _inside(obj: ShapeObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which sample points (x [1,n], y [n,1], fractions of the side) the object covers: bool [n,n]."""
    r = obj.diameter / 2
    dx, dy = x - obj.x, y - obj.y
    if SHAPES[obj.shape] == "circle":
        return dx**2 + dy**2 <= r**2
    if SHAPES[obj.shape] == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # upward isosceles triangle, base d and height d: half-width grows from 0 at the apex to d/2 at the base
    depth = dy + r  # distance below the apex
    return (depth >= 0) & (dy <= r) & (np.abs(dx) <= depth / 2)


def _coverage(obj: ShapeObject, resolution: int) -> np.ndarray:
    """Fraction of each pixel the object covers, float32 [H, W]: 4x supersampling and a box filter."""
    n = resolution * SUPERSAMPLE
    centres = (np.arange(n) + 0.5) / n  # supersample pixel centres, fractions of the side
    inside = _inside(obj, centres[None, :], centres[:, None]).astype(np.float32)
    return einops.reduce(inside, "(h s1) (w s2) -> h w", "mean", s1=SUPERSAMPLE, s2=SUPERSAMPLE)


def render_shapes(objects: list[ShapeObject], resolution: int) -> np.ndarray:
    """Render a scene to uint8 [H,W,3] on black, anti-aliased by 4x supersampling and a box filter."""
    canvas = np.zeros((resolution, resolution, 3), np.float32)
    for obj in objects:  # objects never overlap
        canvas += _coverage(obj, resolution)[:, :, None] * np.asarray(COLOR_RGB[obj.color], np.float32)
    return np.round(canvas).clip(0, 255).astype(np.uint8)


def render_layout(objects: list[ShapeObject], resolution: int) -> np.ndarray:
    """The scene's semantic map, int64 [H, W]: 0 on the background, 1 + colour index where an object covers at least
    half the pixel (the renderer's own geometry and supersampling), LAYOUT_CLASSES classes in all."""
    layout = np.zeros((resolution, resolution), np.int64)
    for obj in objects:
        layout[_coverage(obj, resolution) >= 0.5] = 1 + obj.color
    return layout


class ShapesDataset(Dataset):
    """Procedural shapes scenes, deterministic per (seed, index): image, caption and attribute indices; with
    `layout`, also the semantic map (render_layout) for layout-to-image. `combinations` "seen" leaves out the HELD_OUT
    colour x shape x position triples (training), "held_out" draws only those (evaluation), "all" draws any."""

    def __init__(self, size: int, resolution: int = 32, num_objects: int = 1, seed: int = 0, layout: bool = False,
                 combinations: str = "all"):
        if size <= 0 or resolution <= 0 or seed < 0:
            raise ValueError(f"need size > 0, resolution > 0, seed >= 0; got {size=}, {resolution=}, {seed=}")
        if num_objects not in (1, 2):
            raise ValueError(f"num_objects must be 1 or 2, got {num_objects}")
        self.size, self.resolution, self.num_objects, self.seed = size, resolution, num_objects, seed
        if combinations not in COMBINATIONS:
            raise ValueError(f"combinations must be one of {COMBINATIONS}, got {combinations!r}")
        self.layout, self.combinations = layout, combinations
        self._rendered = self._done = None  # filled lazily by _pixels

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> list[ShapeObject]:
        """The objects of item `index`, from a generator seeded by (seed, index) alone."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for ShapesDataset of size {self.size}")
        return sample_attributes(np.random.default_rng([self.seed, index]), self.num_objects, self.combinations)

    def _pixels(self, index: int, objects) -> np.ndarray:
        """Rendered uint8 image, kept after the first render: a scene is a pure function of (seed, index), and
        re-rendering it every epoch would cost more CPU than the tiny models train with."""
        if self._rendered is None:
            self._rendered = np.zeros((self.size, self.resolution, self.resolution, 3), np.uint8)
            self._done = np.zeros(self.size, bool)
        if not self._done[index]:
            self._rendered[index] = render_shapes(objects, self.resolution)
            self._done[index] = True
        return self._rendered[index]

    def __getitem__(self, index: int) -> dict:
        objects = self.scene(index)
        item = {
            "image": uint8_to_tensor(self._pixels(index, objects)),
            "caption": describe(objects),
            "label": -1,
            "key": f"shapes-{self.seed}-{index:07d}",
            "attrs": {name: torch.tensor([getattr(o, name) for o in objects]) for name in VOCABULARIES},
        }
        if self.layout:  # cheap next to the image: not kept
            item["layout"] = torch.from_numpy(render_layout(objects, self.resolution))
        return item
