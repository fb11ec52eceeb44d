"""Pairs and datasets declared in the thresholds file (``pairs:`` and ``datasets:``), built on demand.

A pair is a torchvision architecture (``arch``) or a user function (``builder: module:function``)
returning the FP32 model or an (FP32, quantized) tuple, with weights from a checkpoint (loaded safely,
see qrobust.loading), a quantization ``preset`` calibrated on a ``calibration`` dataset, the
``preprocess`` of the model and the ``dataset`` it is gated on. A dataset is an image folder (one
subfolder per class, optional bounding boxes in a JSON file) or a ``builder`` returning a torch Dataset of
(pixels in [0, 1], label) items. Paths are relative to the thresholds file.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from qrobust.data import Batch, StreamingSet
from qrobust.errors import InvalidArgument, invalid
from qrobust.pairs import ModelPair, Preprocess

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)  # image decoding threads of a folder dataset
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def import_object(spec: str, key: str):
    """``module:attribute`` -> the attribute; errors name the config key."""
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise invalid(key, spec, f"cannot import ({exc})") from None


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


def build_pair(name: str, spec: dict, base: Path, datasets: dict) -> ModelPair:
    """The ModelPair a ``pairs:`` entry describes (validated already by qrobust.thresholds)."""
    from qrobust.loading import load_checkpoint
    from qrobust.quantize import PRESETS, quantize_model, quantized_module_names
    from qrobust.zoo import TORCHVISION_ARCHS, build_arch

    pre = spec["preprocess"]
    preprocess = Preprocess(tuple(pre["resolution"]), tuple(pre["mean"]), tuple(pre["std"]))
    weights = spec.get("weights")
    weights_path = None if weights in (None, "hub", "random") else base / weights
    if "arch" in spec:
        fp32 = build_arch(spec["arch"], int(spec["num_classes"]), str(weights_path or weights), spec.get("trust", False))
        quantized = None
    else:
        built = import_object(spec["builder"], f"pairs.{name}.builder")()
        fp32, quantized = built if isinstance(built, tuple) else (built, None)
        if weights_path is not None:
            state = load_checkpoint(weights_path, trust=spec.get("trust", False))
            fp32.load_state_dict(state.state_dict() if isinstance(state, torch.nn.Module) else state)
    fp32.eval()
    if quantized is None:
        config = PRESETS.get(spec["preset"])
        cal = spec["calibration"]
        data = datasets[cal["dataset"]].subset(int(cal.get("samples", 128)), 0)
        quantized = quantize_model(fp32, config, (preprocess.normalize(b.images) for b in data.batches(32)))
    else:
        config = PRESETS.get(spec.get("preset") or ("int8-x86" if quantized_module_names(quantized) else "fake-w8a8"))
    target = spec.get("target_layer") or TORCHVISION_ARCHS.get(spec.get("arch", ""))
    from qrobust.pairs import sha256_file

    metadata = {"engine": config.engine, "declared": True, "weights_source": str(weights),
                "random_weights": weights == "random"}
    if weights_path is not None:
        metadata["weights"] = {str(weights_path): sha256_file(weights_path)}
    try:
        return ModelPair(name, fp32, quantized, config.kind, config, preprocess, int(spec["num_classes"]),
                         spec["dataset"], target, spec.get("quantized_target_layer"), metadata)
    except InvalidArgument as exc:
        raise invalid(f"pairs.{name}", spec, str(exc)) from None
