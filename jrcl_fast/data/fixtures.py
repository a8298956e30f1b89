"""Split files shaped like the published ones, at their published sizes, without images.

iNaturalist 2018: train2018.json / val2018.json (COCO style: images {id, file_name,
width, height, ...}, annotations {id, image_id, category_id}, categories {id, name,
supercategory}), 437,513 train and 24,426 val entries (3 per class), 8,142 classes in
the published shot groups: 842 many (> 100 training images), 4,076 medium (20-100)
and 3,224 few (< 20). Places-LT: Places_LT_{train,val,test}.txt, 365 classes, 62,500
training images from 4,980 down to 5 per class, 20 val and 100 test images per class.

The benchmarks (benchmarks/bench_metadata.py) use them at full size and the tests at
a reduced `scale`; the class names, ids and paths are made up, the shapes are not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jrcl_fast.atomic import atomic_write_bytes


@dataclass(frozen=True)
class ShotProfile:
    """Training images per class, in groups of (classes, most, fewest), and their total."""

    groups: tuple[tuple[int, int, int], ...]
    total: int


# Many: 101-1,000 (iNat2018's largest class has 1,000), medium: 20-100, few: 2-19.
INAT2018_TRAIN = ShotProfile(((842, 1000, 101), (4076, 100, 20), (3224, 19, 2)), total=437_513)
INAT2018_VAL_PER_CLASS = 3
INAT2018_SUPERCATEGORIES = ("Plantae", "Insecta", "Aves", "Reptilia", "Mammalia", "Fungi", "Amphibia",
                            "Mollusca", "Animalia", "Arachnida", "Actinopterygii", "Chromista", "Protozoa",
                            "Bacteria")
PLACES_LT_TRAIN = ShotProfile(((365, 4980, 5),), total=62_500)
PLACES_LT_VAL_PER_CLASS, PLACES_LT_TEST_PER_CLASS = 20, 100


def _curve(size: int, most: int, fewest: int, power: float) -> np.ndarray:
    """`size` counts falling from `most` to `fewest` on a log scale, bent by `power`."""
    x = np.linspace(0.0, 1.0, size) if size > 1 else np.zeros(1)
    return np.rint(fewest * (most / fewest) ** ((1.0 - x) ** power)).astype(np.int64)


def _fit(size: int, most: int, fewest: int, total: int) -> np.ndarray:
    """The falling curve of `size` counts in [fewest, most] whose sum is exactly `total`."""
    if not size * fewest <= total <= size * most:
        raise ValueError(f"{size} classes of {fewest}-{most} images cannot hold {total}")
    lo, hi = 1e-3, 1e3  # a larger power bends the curve down faster: fewer images
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if _curve(size, most, fewest, mid).sum() > total else (lo, mid)
    counts = _curve(size, most, fewest, hi)
    # Rounding leaves a few images over or under: add them to (take them from) the
    # classes with room, keeping the order falling.
    short = total - int(counts.sum())
    room = np.flatnonzero(counts < most) if short > 0 else np.flatnonzero(counts > fewest)[::-1]
    counts[room[:abs(short)]] += np.sign(short)
    return np.sort(counts)[::-1]


def class_counts(profile: ShotProfile, scale: float = 1.0) -> np.ndarray:
    """Training images per class, largest first: each group falls along a log curve
    within its range, and the first group's curve is bent so that the total is exactly
    `profile.total`. `scale` < 1 shrinks the number of classes of each group (at least
    one each) and keeps each group's range, so the shot groups keep their meaning; the
    total then follows from the shape."""
    sizes = [max(1, round(size * scale)) for size, _, _ in profile.groups]
    rest = [_curve(size, most, fewest, 1.0) for size, (_, most, fewest) in zip(sizes[1:], profile.groups[1:])]
    (_, most, fewest) = profile.groups[0]
    if scale != 1.0:
        return np.concatenate([_curve(sizes[0], most, fewest, 1.0), *rest])
    return np.concatenate([_fit(sizes[0], most, fewest, profile.total - sum(int(r.sum()) for r in rest)), *rest])


def _write_json(path: Path, payload: dict) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(payload, separators=(",", ":")).encode()))


def write_inat2018(root: Path, scale: float = 1.0, seed: int = 0) -> Path:
    """train2018.json and val2018.json under `root` (created), iNat2018-shaped; returns root.
    Category ids are a shuffled, non-contiguous set, as a reader must not assume 0..C-1."""
    rng = np.random.default_rng(seed)
    counts = class_counts(INAT2018_TRAIN, scale)
    num_classes = len(counts)
    ids = np.sort(rng.choice(num_classes * 2, num_classes, replace=False))
    supers = [INAT2018_SUPERCATEGORIES[k % len(INAT2018_SUPERCATEGORIES)] for k in rng.permutation(num_classes)]
    categories = [{"id": int(c), "name": f"{s} species {c}", "supercategory": s} for c, s in zip(ids, supers)]
    by_class = rng.permutation(num_classes)  # which category gets the k-th largest count
    root.mkdir(parents=True, exist_ok=True)
    next_id = 0
    for name, per_class in (("train2018.json", counts), ("val2018.json", np.full(num_classes, INAT2018_VAL_PER_CLASS))):
        labels = np.repeat(by_class, per_class)
        labels = labels[rng.permutation(len(labels))]
        images, annotations = [], []
        for k, label in enumerate(labels.tolist()):
            category = categories[label]
            images.append({"id": next_id + k, "file_name": f"train_val2018/{category['supercategory']}/"
                           f"{category['id']}/{rng.bytes(16).hex()}.jpg", "width": 800, "height": 600,
                           "license": 1, "rights_holder": "fixture"})
            annotations.append({"id": next_id + k, "image_id": next_id + k, "category_id": category["id"]})
        next_id += len(labels)
        _write_json(root / name, {"info": {"year": 2018, "description": "jrcl_fast fixture, iNat2018-shaped"},
                                  "images": images, "annotations": annotations, "categories": categories,
                                  "licenses": [{"id": 1, "name": "fixture"}]})
    return root


def write_places_lt(root: Path, scale: float = 1.0, seed: int = 0) -> Path:
    """Places_LT_{train,val,test}.txt under `root` (created), Places365-style paths
    (/a/abbey/00000001.jpg); returns root."""
    rng = np.random.default_rng(seed)
    counts = class_counts(PLACES_LT_TRAIN, scale)
    letters = [chr(ord("a") + k % 26) for k in range(len(counts))]  # Places365's first-letter folders
    scenes = [f"{letter}/{letter}scene{k:03d}" for k, letter in enumerate(letters)]
    by_class = rng.permutation(len(counts))
    per_split = {"train": counts, "val": np.full(len(counts), PLACES_LT_VAL_PER_CLASS),
                 "test": np.full(len(counts), PLACES_LT_TEST_PER_CLASS)}
    root.mkdir(parents=True, exist_ok=True)
    for split, per_class in per_split.items():
        labels = np.repeat(by_class, per_class)
        labels = labels[rng.permutation(len(labels))]
        lines = "".join(f"/{scenes[y]}/{k:08d}.jpg {y}\n" for k, y in enumerate(labels.tolist()))
        atomic_write_bytes(root / f"Places_LT_{split}.txt", lambda f, text=lines: f.write(text.encode()))
    return root
