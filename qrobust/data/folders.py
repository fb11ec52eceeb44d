"""Datasets declared in the thresholds file (``datasets:``): image folders and user builders, streamed.

An image folder has one subfolder per class (sorted names give the labels) and optional bounding boxes
in a JSON file; a ``builder`` (``module:function``) returns a torch Dataset of (pixels in [0, 1], label)
items. Paths are relative to the thresholds file.

Images are read the way a user's own evaluation reads them: torchvision's eval transform by default
(resize the short side to ``resize`` = crop / 0.875, then centre-crop ``resolution``), or ``resize:
stretch`` to squash the whole image to ``resolution``. Only regular files are read (a FIFO named
``.png`` would block forever), images above ``MAX_PIXELS`` are refused before decoding, 16-bit images
keep their range, and boxes are checked against each image's size. Every image is probed when the
dataset is built, before any model (header, size, and the last bytes of PNG and JPEG files), and all of
a folder's bad files are named in one line; every other problem is one line naming the file.
"""
from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qrobust._files import MiB, check_regular_file, read_bounded
from qrobust._validation import is_number
from qrobust.data.datasets import Batch, StreamingSet
from qrobust.errors import InvalidArgument, invalid, show
from qrobust.registry import import_object

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)  # image decoding threads of a folder dataset
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MAX_PIXELS = 64_000_000  # 8000 x 8000: more is a mistake or a decompression bomb (Pillow's own limit is ~179 M)
MAX_IMAGE_BYTES = 256 * MiB
MAX_BOXES_BYTES = 64 * MiB
CROP_RATIO = 0.875  # torchvision's eval transform: Resize(256) + CenterCrop(224)
END_MARKERS = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9", "MPO": b"\xff\xd9"}  # a whole file's last bytes (IEND + CRC, EOI)
PROBE_LISTED = 3  # bad files named in a dataset's one line


@dataclass(frozen=True)
class ImageReader:
    """How a file becomes a (C, H, W) tensor in [0, 1]: decode, resize, centre crop."""

    resolution: tuple[int, int]
    resize: int | str | None = None  # short side before the crop; None: crop / 0.875; "stretch": no crop
    channels: int = 3

    @property
    def short_side(self) -> int:
        return self.resize if isinstance(self.resize, int) else round(max(self.resolution) / CROP_RATIO)

    def geometry(self, width: int, height: int) -> tuple[float, float, int, int, int, int]:
        """(scale x, scale y, resized width, resized height, crop left, crop top) for an image."""
        out_h, out_w = self.resolution
        if self.resize == "stretch":
            return out_w / width, out_h / height, out_w, out_h, 0, 0
        factor = self.short_side / min(width, height)
        new_w, new_h = max(out_w, round(width * factor)), max(out_h, round(height * factor))
        return new_w / width, new_h / height, new_w, new_h, (new_w - out_w) // 2, (new_h - out_h) // 2

    def read(self, path: Path, channels: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """The transformed pixels and the original (width, height)."""
        pixels = decode(path, channels or self.channels)
        height, width = pixels.shape[1:]
        _, _, new_w, new_h, left, top = self.geometry(width, height)
        x = F.interpolate(pixels[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
        out_h, out_w = self.resolution
        return x[:, top:top + out_h, left:left + out_w].clamp_(0, 1), (width, height)

    def box(self, box: list[float], width: int, height: int, where: str) -> list[int]:
        """A box in the image's own pixels, checked against its size, mapped into the crop."""
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise invalid("boxes", where, f"box {box} is not inside the {width}x{height} image "
                                          "([x0, y0, x1, y1], 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)")
        sx, sy, _, _, left, top = self.geometry(width, height)
        out_h, out_w = self.resolution
        mapped = [min(max(round(x0 * sx) - left, 0), out_w), min(max(round(y0 * sy) - top, 0), out_h),
                  min(max(round(x1 * sx) - left, 0), out_w), min(max(round(y1 * sy) - top, 0), out_h)]
        if mapped[2] <= mapped[0] or mapped[3] <= mapped[1]:
            raise invalid("boxes", where, f"box {box} falls outside the {out_w}x{out_h} centre crop")
        return mapped


def decode(path: Path, channels: int) -> torch.Tensor:
    """(C, H, W) float pixels in [0, 1] of a regular image file, bit depth respected (16-bit PNGs keep
    their 65,536 levels; a plain convert("RGB") would clip them to white)."""
    from PIL import Image

    check_regular_file(path, "image", MAX_IMAGE_BYTES)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise invalid("image", str(path), f"{width}x{height} pixels, over the limit of {MAX_PIXELS} "
                                                  "(a decompression bomb or a mistake)")
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                array = np.asarray(img, dtype=np.float64)
                top = {"F": 1.0, "I": 2.0**32 - 1}.get(img.mode, 65535.0)
                grey = torch.from_numpy(array / top).float().clamp_(0, 1)[None]
                return grey if channels == 1 else grey.expand(3, -1, -1).clone()
            converted = img.convert("L" if channels == 1 else "RGB")
            array = np.asarray(converted, dtype=np.uint8)
    except InvalidArgument:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise invalid("image", str(path), f"cannot be read ({type(exc).__name__}: {show(str(exc), 120)})") from None
    pixels = torch.from_numpy(array.copy()).float().div_(255)
    return pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)


def _saliency_path(saliency_root: Path, rel: Path) -> Path:
    for candidate in (saliency_root / rel, (saliency_root / rel).with_suffix(".png")):
        if candidate.is_file():
            return candidate
    raise invalid("saliency", str(saliency_root), f"has no map for {show(rel.as_posix())} (same path, or .png)")


def list_images(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted subfolders) and (image file, label) pairs (``probe_images`` checks the files)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, label) for label, name in enumerate(classes)
             for f in sorted((root / name).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    return classes, files


def probe(path: Path) -> str | None:
    """Why an image file cannot be read, or None, from its header and its last bytes (no decoding).

    A PNG or JPEG that does not end with its end marker (IEND, EOI) is loaded to be sure: a phone's
    motion photo appends a video after EOI and decodes fine; a cut-off download does not."""
    from PIL import Image, UnidentifiedImageError

    try:
        info = path.stat()
    except OSError as exc:
        return "a broken link" if path.is_symlink() else f"cannot be read: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size > MAX_IMAGE_BYTES:
        return f"{info.st_size} bytes, over the limit of {MAX_IMAGE_BYTES}"
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                return f"{width}x{height} pixels, over the limit of {MAX_PIXELS}"
            marker = END_MARKERS.get(img.format or "")
            if marker is not None:
                with open(path, "rb") as fh:
                    fh.seek(-len(marker), os.SEEK_END)
                    if fh.read() != marker:
                        img.draft(img.mode, (1, 1))  # a JPEG at 1/8 scale (every byte read, few pixels made)
                        img.load()
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        if "truncated" in str(exc).lower():  # Pillow's words for a file that ends too soon, header or data
            return "truncated"
        return f"cannot be read: {type(exc).__name__}: {show(str(exc), 120)}"
    return None


def probe_images(name: str, root: Path, paths: list[Path]) -> None:
    """Every image of a folder dataset probed once, before any model is built, and all bad files named in
    one line (a file found bad only when its batch is decoded fails the pair after it was built). Files
    are named from the folder, which is named once: the line must stay short enough to be read whole."""
    bad = [(path, why) for path in paths if (why := probe(path)) is not None]
    if bad:
        listed = ", ".join(f"{show(path.relative_to(root).as_posix())} ({why})" for path, why in bad[:PROBE_LISTED])
        more = f", and {len(bad) - PROBE_LISTED} more" if len(bad) > PROBE_LISTED else ""
        raise invalid("dataset", name, f"{len(bad)} of {len(paths)} images in {show(str(root), 200)} cannot be read: "
                                       f"{listed}{more}")


def read_boxes(path: Path, rels: list[str]) -> dict[str, list[float]]:
    """``{relative path: [x0, y0, x1, y1]}`` with a box for every image; each entry checked for shape."""
    try:
        boxes = json.loads(read_bounded(path, "boxes", MAX_BOXES_BYTES).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid("boxes", str(path), f"is not valid JSON ({show(str(exc), 120)})") from None
    if not isinstance(boxes, dict):
        raise invalid("boxes", str(path), f"must map each image's relative path to [x0, y0, x1, y1], got "
                                          f"{type(boxes).__name__}")
    for rel in rels:
        if rel not in boxes:
            raise invalid("boxes", str(path), f"has no box for {show(rel)}")
        box = boxes[rel]
        if (not isinstance(box, list) or len(box) != 4
                or not all(is_number(v) and math.isfinite(v) for v in box)):
            raise invalid("boxes", f"{path}: {show(rel)}", f"expected [x0, y0, x1, y1] as four finite numbers, "
                                                           f"got {show(box)}")
    return boxes


def folder_dataset(name: str, root: Path, reader: ImageReader, boxes_file: Path | None = None,
                   saliency_root: Path | None = None, workers: int = DEFAULT_WORKERS) -> StreamingSet:
    """Images under ``root/<class>/``, class = subfolder (sorted), read by ``reader``, streamed.

    ``saliency_root`` holds a ground-truth saliency map (greyscale) per image at the same relative path.
    """
    classes, files = list_images(root)
    if not files:
        raise invalid("dataset", name, f"no images under {root} (one subfolder per class expected)")
    probe_images(name, root, [f for f, _ in files])
    rels = [f.relative_to(root).as_posix() for f, _ in files]
    boxes = read_boxes(boxes_file, rels) if boxes_file is not None else None
    if saliency_root is not None:
        for f, _ in files:
            _saliency_path(saliency_root, f.relative_to(root))

    def load(indices: torch.Tensor) -> Batch:
        images, labels, out_boxes, maps = [], [], [], []
        for i in indices.tolist():
            path, label = files[i]
            x, (w, h) = reader.read(path)
            images.append(x)
            labels.append(label)
            if saliency_root is not None:
                maps.append(reader.read(_saliency_path(saliency_root, path.relative_to(root)), channels=1)[0][0])
            if boxes is not None:
                out_boxes.append(reader.box(boxes[rels[i]], w, h, f"{boxes_file}: {show(rels[i])}"))
        return Batch(torch.stack(images), torch.tensor(labels), indices.clone(), indices.clone(),
                     torch.tensor(out_boxes) if boxes is not None else None,
                     torch.stack(maps) if saliency_root is not None else None)

    return StreamingSet(name, len(files), len(classes), load, workers=workers, names=lambda i: rels[i])


def builder_dataset(name: str, spec: str, num_classes: int) -> StreamingSet:
    dataset = import_object(spec, f"datasets.{name}.builder")()

    def load(indices: torch.Tensor) -> Batch:
        items = [dataset[i] for i in indices.tolist()]
        return Batch(torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items]),
                     torch.tensor([int(y) for _, y in items]), indices.clone(), indices.clone())

    return StreamingSet(name, len(dataset), num_classes, load)


def reader_of(spec: dict) -> ImageReader:
    return ImageReader(tuple(spec["resolution"]), spec.get("resize"), int(spec.get("channels", 3)))


def build_dataset(name: str, spec: dict, base: Path, seed: int = 0):
    """The dataset a ``datasets:`` entry describes, subsampled (seeded) to ``max_samples`` when given."""
    if "folder" in spec:
        boxes = base / spec["boxes"] if spec.get("boxes") else None
        saliency = base / spec["saliency"] if spec.get("saliency") else None
        data = folder_dataset(name, base / spec["folder"], reader_of(spec), boxes, saliency,
                              spec.get("workers", DEFAULT_WORKERS))
    else:
        data = builder_dataset(name, spec["builder"], int(spec["num_classes"]))
    return data.subset(spec.get("max_samples"), seed)
