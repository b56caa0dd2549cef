"""The shapes benchmark's vocabulary and options: colours, kinds and backgrounds, and `ShapesConfig`, everything that
shapes a generated data set except its seed and image counts (stored in ``manifest.json`` under ``options``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from padt.geometry.grids import rounded_grid

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (45, 85, 230), "yellow": (235, 215, 40),
    "white": (240, 240, 240), "orange": (240, 140, 30), "cyan": (40, 210, 220), "pink": (240, 130, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (120, 120, 120), "black": (25, 25, 25), "purple": (85, 45, 105), "brown": (105, 75, 45),
}
KINDS = ("square", "circle", "triangle")
PROMPT_ORDERS = ("auto", "shuffle", "id")
CELL_CLASS_SETS = ("kind", "colour_kind")


def cell_class_names(options: Mapping[str, Sequence[str]], classes: str = "kind") -> list[str]:
    """Cell categories of a generated set, from its manifest's `options`: the kinds (`"kind"`), or every
    "colour kind" (`"colour_kind"`, colours outer). Used by vision stage 0 and the cell-category loss."""
    if classes == "kind":
        return list(options["kinds"])
    if classes == "colour_kind":
        return [f"{colour} {kind}" for colour in options["colours"] for kind in options["kinds"]]
    raise ValueError(f"cell classes must be one of {CELL_CLASS_SETS}, got {classes!r}")


@dataclass(frozen=True)
class ShapesConfig:
    """Everything that shapes the data (the seed and the image counts excepted); stored in ``manifest.json``."""

    height: int = 168
    width: int = 168
    patch_size: int = 14
    merge_size: int = 2
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "white")
    kinds: tuple[str, ...] = KINDS
    backgrounds: tuple[str, ...] = ("gray", "black", "purple", "brown")
    min_objects: int = 1
    max_objects: int = 4
    max_same: int = 2  # at most this many objects share (colour, kind)
    size_range: tuple[float, float] = (0.25, 0.5)  # shape side / min(H, W)
    max_occlusion: float = 0.3  # largest hidden fraction of a shape
    min_cells: int = 2  # fewest foreground merged cells of a visible object, under every task's rule
    position_margin: float = 0.15  # "on the left": centres at least this fraction of the width apart
    size_ratio: float = 1.5  # "the larger": visible area at least this many times the other's
    colour_jitter: int = 15  # per-channel +/- on a shape's fill
    background_jitter: int = 12  # per-channel +/- on the background colour
    gradient: int = 12  # largest +/- of the background's linear ramp
    noise: int = 3  # per-pixel +/- noise on the whole image
    ovd_prompt_order: str = "auto"  # auto: shuffled for "train", category-id order for other splits
    max_attempts: int = 500

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1 or self.patch_size < 1 or self.merge_size < 1:
            raise ValueError(f"image size, patch_size and merge_size must be >= 1, got {self.height}x{self.width}, "
                             f"{self.patch_size}, {self.merge_size}")
        if min(self.grid) < 1:
            raise ValueError(f"a {self.height}x{self.width} image has no {self.cell_size}-px merged cell")
        for name, values, known in (("colours", self.colours, PALETTE), ("kinds", self.kinds, KINDS),
                                    ("backgrounds", self.backgrounds, BACKGROUNDS)):
            unknown = [v for v in values if v not in known]
            if not values or unknown or len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct names from {sorted(known)}, got {list(values)}")
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.max_objects > self.max_same * len(self.colours) * len(self.kinds):
            raise ValueError("max_objects exceeds max_same x colours x kinds: no scene can satisfy max_same")
        if self.max_same < 1:
            raise ValueError(f"max_same must be >= 1, got {self.max_same}")
        lo, hi = self.size_range
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"size_range must satisfy 0 < low <= high <= 1, got {self.size_range}")
        if not 0 <= self.max_occlusion < 1 or self.position_margin < 0 or self.size_ratio < 1 or self.min_cells < 1:
            raise ValueError("need 0 <= max_occlusion < 1, position_margin >= 0, size_ratio >= 1, min_cells >= 1")
        if min(self.colour_jitter, self.background_jitter, self.gradient, self.noise) < 0:
            raise ValueError("colour_jitter, background_jitter, gradient and noise must be >= 0")
        if self.ovd_prompt_order not in PROMPT_ORDERS:
            raise ValueError(f"ovd_prompt_order must be one of {PROMPT_ORDERS}, got {self.ovd_prompt_order!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    @property
    def cell_size(self) -> int:
        """Pixels per merged cell (patch_size * merge_size)."""
        return self.patch_size * self.merge_size

    @property
    def grid(self) -> tuple[int, int]:
        """(grid_h, grid_w) of the stored ``patches``: the released rounded grid."""
        return rounded_grid(self.height, self.width, cell_size=self.cell_size)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
