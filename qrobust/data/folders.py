"""Datasets declared in the thresholds file (``datasets:``): image folders and user builders, streamed.

An image folder has one subfolder per class (sorted names give the labels) and optional bounding boxes
in a JSON file; a ``builder`` (``module:function``) returns a torch Dataset of (pixels in [0, 1], label)
items. Paths are relative to the thresholds file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from qrobust.data.datasets import Batch, StreamingSet
from qrobust.errors import invalid
from qrobust.registry import import_object

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)  # image decoding threads of a folder dataset
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _load_image(path: Path, resolution: tuple[int, int], mode: str = "RGB") -> tuple[torch.Tensor, tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = img.convert(mode)
    except OSError as exc:
        raise invalid("image", str(path), f"cannot be read ({exc})") from None
    channels = len(mode)
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(rgb.height, rgb.width, channels)
    x = pixels.permute(2, 0, 1).float().div_(255).unsqueeze(0)
    x = F.interpolate(x, size=resolution, mode="bilinear", antialias=True, align_corners=False)
    return x[0].clamp_(0, 1), (rgb.width, rgb.height)


def _saliency_path(saliency_root: Path, rel: Path) -> Path:
    for candidate in (saliency_root / rel, (saliency_root / rel).with_suffix(".png")):
        if candidate.is_file():
            return candidate
    raise invalid("saliency", str(saliency_root), f"has no map for {rel.as_posix()!r} (same path, or .png)")


def folder_dataset(name: str, root: Path, resolution: tuple[int, int], boxes_file: Path | None = None,
                   saliency_root: Path | None = None, workers: int = DEFAULT_WORKERS) -> StreamingSet:
    """Images under ``root/<class>/``, class = subfolder (sorted), resized to ``resolution``, streamed.

    ``saliency_root`` holds a ground-truth saliency map (greyscale) per image at the same relative path.
    """
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, label) for label, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise invalid("dataset", name, f"no images under {root} (one subfolder per class expected)")
    boxes = None
    if boxes_file is not None:
        boxes = json.loads(boxes_file.read_text(encoding="utf-8"))
        for f, _ in files:
            rel = f.relative_to(root).as_posix()
            if rel not in boxes:
                raise invalid("boxes", str(boxes_file), f"has no box for {rel!r}")
    if saliency_root is not None:
        for f, _ in files:
            _saliency_path(saliency_root, f.relative_to(root))

    def load(indices: torch.Tensor) -> Batch:
        images, labels, out_boxes, maps = [], [], [], []
        for i in indices.tolist():
            path, label = files[i]
            x, (w, h) = _load_image(path, resolution)
            images.append(x)
            labels.append(label)
            if saliency_root is not None:
                maps.append(_load_image(_saliency_path(saliency_root, path.relative_to(root)), resolution, "L")[0][0])
            if boxes is not None:
                x0, y0, x1, y1 = boxes[path.relative_to(root).as_posix()]
                sy, sx = resolution[0] / h, resolution[1] / w
                out_boxes.append([round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)])
        return Batch(torch.stack(images), torch.tensor(labels), indices.clone(), indices.clone(),
                     torch.tensor(out_boxes) if boxes is not None else None,
                     torch.stack(maps) if saliency_root is not None else None)

    return StreamingSet(name, len(files), len(classes), load, workers=workers)


def builder_dataset(name: str, spec: str, num_classes: int) -> StreamingSet:
    dataset = import_object(spec, f"datasets.{name}.builder")()

    def load(indices: torch.Tensor) -> Batch:
        items = [dataset[i] for i in indices.tolist()]
        return Batch(torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items]),
                     torch.tensor([int(y) for _, y in items]), indices.clone(), indices.clone())

    return StreamingSet(name, len(dataset), num_classes, load)


def build_dataset(name: str, spec: dict, base: Path, seed: int = 0):
    """The dataset a ``datasets:`` entry describes, subsampled (seeded) to ``max_samples`` when given."""
    if "folder" in spec:
        boxes = base / spec["boxes"] if spec.get("boxes") else None
        saliency = base / spec["saliency"] if spec.get("saliency") else None
        data = folder_dataset(name, base / spec["folder"], tuple(spec["resolution"]), boxes, saliency,
                              spec.get("workers", DEFAULT_WORKERS))
    else:
        data = builder_dataset(name, spec["builder"], int(spec["num_classes"]))
    return data.subset(spec.get("max_samples"), seed)
