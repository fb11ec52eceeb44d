"""Evaluation datasets as in-memory pixel tensors in [0, 1], with stable sample and source ids.

Every sample carries an ``id`` (seeds its perturbation noise, so results do not depend on batching) and
a ``group`` (the source image it was derived from; the bootstrap resamples groups, because views of one
photo are not independent samples).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch
import torch.nn.functional as F

from qrobust.errors import invalid
from qrobust.registry import Registry


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # (n, C, H, W) float32 pixels in [0, 1]
    labels: torch.Tensor  # (n,) int64
    ids: torch.Tensor  # (n,) int64
    groups: torch.Tensor  # (n,) int64
    boxes: torch.Tensor | None = None  # (n, 4) x0, y0, x1, y1 in pixels (exclusive end)
    saliency: torch.Tensor | None = None  # (n, H, W) ground-truth saliency maps in [0, 1] (seed 001)


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise invalid("batch_size", batch_size, "must be a positive integer")
    return batch_size


def subset_positions(length: int, max_samples: int | None, seed: int) -> torch.Tensor | None:
    """Sorted positions of a seeded subsample of ``max_samples``, or None when everything is kept."""
    if max_samples is None or max_samples >= length:
        return None
    if max_samples < 1:
        raise invalid("max_samples", max_samples, "must be >= 1")
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:max_samples].sort().values


@dataclass(frozen=True)
class ImageSet:
    """A labelled image set; validated on construction so a gate never runs on garbage."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    groups: torch.Tensor
    num_classes: int
    boxes: torch.Tensor | None = None

    def __post_init__(self):
        x = self.images
        if x.dim() != 4:
            raise invalid("images", tuple(x.shape), f"dataset {self.name!r}: expected (N, C, H, W)")
        if x.shape[0] == 0:
            raise invalid("dataset", self.name, "is empty: a gate on no samples proves nothing")
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise invalid("images", self.name, "pixels must be finite and in [0, 1]")
        n = x.shape[0]
        for field_name in ("labels", "ids", "groups"):
            if getattr(self, field_name).shape != (n,):
                raise invalid(field_name, tuple(getattr(self, field_name).shape), f"expected ({n},)")
        if len(set(self.ids.tolist())) != n:
            raise invalid("ids", self.name, "sample ids must be unique")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, max_samples: int | None, seed: int = 0) -> "ImageSet":
        """A seeded random subset of at most ``max_samples`` (kept in id order)."""
        pick = subset_positions(len(self), max_samples, seed)
        if pick is None:
            return self
        boxes = None if self.boxes is None else self.boxes[pick]
        return ImageSet(self.name, self.images[pick], self.labels[pick], self.ids[pick], self.groups[pick],
                        self.num_classes, boxes)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        check_batch_size(batch_size)
        for start in range(0, len(self), batch_size):
            s = slice(start, start + batch_size)
            yield Batch(self.images[s], self.labels[s], self.ids[s], self.groups[s],
                        None if self.boxes is None else self.boxes[s])


class StreamingSet:
    """A dataset produced batch by batch from indices, so evaluation memory does not grow with its size.

    ``load(indices)`` returns a Batch for those dataset positions (pixels, labels, ids, groups); used
    for large folders and generated benchmark sets. With ``workers`` > 0, that many threads decode the
    next batches while the models run (image decoding and resizing release the GIL); at most
    ``2 * workers`` batches are held ahead, and batches come out in order.
    """

    def __init__(self, name: str, length: int, num_classes: int, load, indices: torch.Tensor | None = None,
                 workers: int = 0):
        if length < 1:
            raise invalid("dataset", name, "is empty: a gate on no samples proves nothing")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise invalid("workers", workers, "must be a whole number >= 0")
        self.name, self.num_classes, self._load = name, num_classes, load
        self._length, self.workers = length, workers
        self.indices = torch.arange(length) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, max_samples: int | None, seed: int = 0) -> "StreamingSet":
        pick = subset_positions(len(self), max_samples, seed)
        if pick is None:
            return self
        return StreamingSet(self.name, self._length, self.num_classes, self._load, self.indices[pick], self.workers)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        check_batch_size(batch_size)
        chunks = self.indices.split(batch_size)
        if self.workers == 0:
            for chunk in chunks:
                yield self._load(chunk)
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.workers, thread_name_prefix=f"qrobust-{self.name}") as pool:
            ahead = deque()
            for chunk in chunks:
                ahead.append(pool.submit(self._load, chunk))
                if len(ahead) > 2 * self.workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()


DATASETS: Registry = Registry("dataset")

DIGITS_RESOLUTION = 32


@lru_cache(maxsize=None)
def _digits_split() -> tuple[ImageSet, ImageSet]:
    """scikit-learn's 1,797 real 8x8 digits, upsampled to 32x32, split 75/25 stratified (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    pixels = F.interpolate(pixels, size=DIGITS_RESOLUTION, mode="bilinear", align_corners=False).clamp_(0, 1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=0.25, random_state=0,
                                           stratify=digits.target)
    sets = []
    for name, idx in (("digits-train", sorted(train_idx)), ("digits-test", sorted(test_idx))):
        idx = torch.tensor(idx)
        sets.append(ImageSet(name, pixels[idx].contiguous(), labels[idx], idx, idx.clone(), num_classes=10))
    return sets[0], sets[1]


DATASETS.register("digits-train", lambda: _digits_split()[0], tags=("builtin", "digits"))
DATASETS.register("digits-test", lambda: _digits_split()[1], tags=("builtin", "digits"))


def load_dataset(name: str) -> ImageSet:
    return DATASETS.get(name)()


# ---- natural photos that ship with scikit-image and scikit-learn (ImageNet-style evaluation) -----------
# Evaluation photos, and a disjoint set for PTQ calibration (textures, microscopy, astronomy, documents):
# calibration never sees an evaluated photo.
EVAL_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "china", "flower")
CALIBRATION_PHOTOS = ("camera", "coins", "clock", "brick", "grass", "gravel", "moon", "hubble_deep_field",
                      "immunohistochemistry", "retina", "colorwheel", "page", "text", "cell")
# (short side as a multiple of the crop, crops): 7 deterministic views per photo
PHOTO_VIEWS = ((8 / 7, ("center", "flip")), (9 / 7, ("top_left", "top_right", "bottom_left", "bottom_right")),
               (10 / 7, ("center",)))


def _photo_pixels(name: str) -> torch.Tensor:
    """(3, H, W) float pixels in [0, 1] of a bundled photo (grey ones repeated over RGB)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_images

        array = load_sample_images().images[("china", "flower").index(name)]
    else:
        from skimage import data

        array = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    pixels = torch.tensor(array, dtype=torch.float32) / 255.0
    return pixels[..., :3].permute(2, 0, 1) if pixels.dim() == 3 else pixels.expand(3, -1, -1)


def photo_views(pixels: torch.Tensor, size: int, views=PHOTO_VIEWS) -> list[torch.Tensor]:
    """Square crops of ``size`` after resizing the short side (antialiased bilinear), torchvision-style."""
    out = []
    for scale, crops in views:
        height, width = pixels.shape[1:]
        factor = round(size * scale) / min(height, width)
        resized = F.interpolate(pixels[None], size=(round(height * factor), round(width * factor)), mode="bilinear",
                                antialias=True, align_corners=False)[0].clamp_(0, 1)
        h, w = resized.shape[1:]
        corners = {"center": ((h - size) // 2, (w - size) // 2), "flip": ((h - size) // 2, (w - size) // 2),
                   "top_left": (0, 0), "top_right": (0, w - size), "bottom_left": (h - size, 0),
                   "bottom_right": (h - size, w - size)}
        for crop in crops:
            y, x = corners[crop]
            view = resized[:, y:y + size, x:x + size]
            out.append(view.flip(-1) if crop == "flip" else view)
    return out


@lru_cache(maxsize=None)
def photo_views_set(size: int = 224) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels, ids, groups) of the evaluation photos' views; id = 100 * photo + view, group = photo."""
    images, ids, groups = [], [], []
    for p, name in enumerate(EVAL_PHOTOS):
        for v, view in enumerate(photo_views(_photo_pixels(name), size)):
            images.append(view)
            ids.append(100 * p + v)
            groups.append(p)
    return torch.stack(images).contiguous(), torch.tensor(ids), torch.tensor(groups)


@lru_cache(maxsize=None)
def calibration_photos(size: int = 224) -> torch.Tensor:
    """Pixels of three crops (center and two corners) of each calibration photo (decoded once: every
    EfficientNet-Lite0 twin calibrates on them)."""
    crops = ((8 / 7, ("center", "top_left", "bottom_right")),)
    return torch.stack([v for name in CALIBRATION_PHOTOS for v in photo_views(_photo_pixels(name), size, crops)])
