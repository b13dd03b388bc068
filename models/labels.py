"""Label sets: class names, the palette that colours PNG masks, and the ignore index."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LabelSet:
    """The classes a model predicts.

    `palette` holds one (r, g, b) per class; `ignore_index` is the label value that
    ground truth uses for "void" (never predicted, skipped in losses and metrics).
    """

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if len(self.palette) != len(self.classes):
            raise ValueError(f"label set {self.name!r}: {len(self.classes)} classes but {len(self.palette)} colours")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "palette": [list(c) for c in self.palette],
            "ignore_index": self.ignore_index,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LabelSet":
        return cls(
            name=d["name"],
            classes=tuple(d["classes"]),
            palette=tuple(tuple(int(v) for v in c) for c in d["palette"]),
            ignore_index=d.get("ignore_index"),
        )

    def flat_palette(self) -> list[int]:
        """A 768-entry palette for PIL "P" images; unused entries (void included) are black."""
        flat = [v for colour in self.palette for v in colour]
        return flat + [0] * (768 - len(flat))


def _voc_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """PASCAL VOC's bit-interleaved colour map."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


VOC = LabelSet(
    name="voc",
    classes=(
        "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
        "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
        "train", "tvmonitor",
    ),
    palette=_voc_palette(21),
    ignore_index=255,
)

# CamVid as in the SegNet split: 11 classes, label 11 is void.
CAMVID = LabelSet(
    name="camvid",
    classes=(
        "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
        "Pedestrian", "Bicyclist",
    ),
    palette=(
        (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
        (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
    ),
    ignore_index=11,
)

LABEL_SETS = {"voc": VOC, "camvid": CAMVID}


def label_set(name: str) -> LabelSet:
    """Look up a built-in label set by name."""
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise ValueError(f"unknown label set {name!r}; built in: {sorted(LABEL_SETS)}, or load one from a checkpoint") from None
