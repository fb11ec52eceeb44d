"""The built-in data: scikit-learn's digits and the natural photos that ship with scikit-image and
scikit-learn, as deterministic pixel tensors (nothing is downloaded)."""
from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from qrobust.data.datasets import DATASETS, ImageSet

DIGITS_RESOLUTION = 32


@cache
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


@cache
def photo_views_set(size: int = 224) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels, ids, groups) of the evaluation photos' views; id = 100 * photo + view, group = photo."""
    images, ids, groups = [], [], []
    for p, name in enumerate(EVAL_PHOTOS):
        for v, view in enumerate(photo_views(_photo_pixels(name), size)):
            images.append(view)
            ids.append(100 * p + v)
            groups.append(p)
    return torch.stack(images).contiguous(), torch.tensor(ids), torch.tensor(groups)


@cache
def calibration_photos(size: int = 224) -> torch.Tensor:
    """Pixels of three crops (center and two corners) of each calibration photo (decoded once: every
    EfficientNet-Lite0 twin calibrates on them)."""
    crops = ((8 / 7, ("center", "top_left", "bottom_right")),)
    return torch.stack([v for name in CALIBRATION_PHOTOS for v in photo_views(_photo_pixels(name), size, crops)])


# ---- "imagenet-photos": the evaluation photos' views with fixed ImageNet labels -----------------------------
# There is no ImageNet ground truth offline, so the labels are the FP32 EfficientNet-Lite0's top-1 on each
# view (computed once and shipped, so the data never depends on a model or on float noise; the smallest
# top-1/top-2 probability gap is 0.0015, and a test checks that the FP32 model still predicts them all).
# Accuracy on this set therefore means agreement with FP32.
IMAGENET_RESOLUTION = 224
IMAGENET_PHOTO_LABELS = (
    722, 465, 542, 542, 678, 632, 678,  # astronaut
    285, 285, 285, 285, 285, 285, 285,  # chelsea: Egyptian cat
    967, 967, 967, 967, 967, 967, 967,  # coffee: espresso
    657, 657, 540, 657, 900, 657, 657,  # rocket: missile
    665, 665, 665, 665, 665, 665, 665,  # motorcycle
    698, 698, 442, 497, 698, 497, 698,  # china
    985, 619, 619, 117, 619, 117, 619,  # flower
)


@cache
def imagenet_photos() -> ImageSet:
    """49 views of 7 photos at 224 px, grouped by photo, with the shipped ImageNet labels."""
    pixels, ids, groups = photo_views_set(IMAGENET_RESOLUTION)
    return ImageSet("imagenet-photos", pixels, torch.tensor(IMAGENET_PHOTO_LABELS), ids, groups, num_classes=1000)


DATASETS.register("imagenet-photos", imagenet_photos, tags=("builtin", "imagenet"))
