"""Evaluation datasets as in-memory pixel tensors in [0, 1], with stable sample and source ids.

Every sample carries an ``id`` (seeds its perturbation noise, so results do not depend on batching) and
a ``group`` (the source image it was derived from; the bootstrap resamples groups, because views of one
photo are not independent samples).
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterator

import torch

from qrobust._validation import check_int
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

    def subset(self, max_samples: int | None, seed: int = 0) -> ImageSet:
        """A seeded random subset of at most ``max_samples`` (kept in id order)."""
        pick = subset_positions(len(self), max_samples, seed)
        if pick is None:
            return self
        boxes = None if self.boxes is None else self.boxes[pick]
        return ImageSet(self.name, self.images[pick], self.labels[pick], self.ids[pick], self.groups[pick],
                        self.num_classes, boxes)

    def sample_name(self, sample_id: int) -> str:
        return str(sample_id)

    def batches(self, batch_size: int, first: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Batches ``first`` to ``stop`` (exclusive; None: to the end) of the set cut into ``batch_size``."""
        check_int("batch_size", batch_size, minimum=1)
        end = len(self) if stop is None else min(len(self), stop * batch_size)
        for start in range(first * batch_size, end, batch_size):
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
                 workers: int = 0, names=None):
        if length < 1:
            raise invalid("dataset", name, "is empty: a gate on no samples proves nothing")
        check_int("workers", workers, minimum=0)
        self.name, self.num_classes, self._load = name, num_classes, load
        self._names = names  # sample id -> a name users recognise (a folder image's relative path)
        self._length, self.workers = length, workers
        self.indices = torch.arange(length) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, max_samples: int | None, seed: int = 0) -> StreamingSet:
        pick = subset_positions(len(self), max_samples, seed)
        if pick is None:
            return self
        return StreamingSet(self.name, self._length, self.num_classes, self._load, self.indices[pick], self.workers,
                            self._names)

    def sample_name(self, sample_id: int) -> str:
        return self._names(sample_id) if self._names is not None else str(sample_id)

    def batches(self, batch_size: int, first: int = 0, stop: int | None = None) -> Iterator[Batch]:
        """Batches ``first`` to ``stop`` (exclusive; None: to the end): only those are decoded."""
        check_int("batch_size", batch_size, minimum=1)
        chunks = self.indices.split(batch_size)[first:stop]
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


DATASETS: Registry = Registry("dataset")  # name -> function returning the dataset


def load_dataset(name: str) -> ImageSet | StreamingSet:
    """A registered dataset by name (the built-ins register when ``qrobust.data`` is imported)."""
    return DATASETS.get(name)()
