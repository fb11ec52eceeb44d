"""Perturbations: pure functions on pixel batches in [0, 1], registered by name with level semantics and tags.

Every perturbation takes float images (N, C, H, W) in [0, 1] at model resolution, before the model's
mean/std normalization, and returns a new tensor (never modifies its input). Level 0 is the identity.
Randomness for a sample comes from (seed, sample id, perturbation, level) alone, so a sample's perturbed
pixels are the same whatever the batch size, order, thread count or xdist worker.

The pixels are also the same on every CPU, by construction. Float32 kernels differ between CPUs: a
reduction sums in another order with another vector width, and a vectorized transcendental (torch's
float32 normal sampler, oneDNN's convolution) is another approximation. So:

* pixels are computed with elementwise IEEE operations only (+, -, *, /, clamp), which every CPU rounds
  the same; blur and bilinear resizing sum their taps one by one in a fixed order;
* noise is drawn in float64 and rounded once to float32, means and deviations are float64 sums taken
  left to right (prefix sums), and the FFT is numpy's (no run-time CPU dispatch). A host whose float64
  transcendental differs in the last bit changes a pixel only where that bit straddles a float32
  rounding boundary: about one value in 5e8;
* FGSM's gradient comes from a float64 copy of the model and its sign has a dead band (``fgsm``).

tests/data/test_host_stability.py runs every family under ATEN_CPU_CAPABILITY=default and avx2,
ONEDNN_MAX_CPU_ISA=SSE41, MKL_ENABLE_INSTRUCTIONS=SSE4_2, libjpeg-turbo without SIMD and one thread,
and compares the bytes.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from qrobust._validation import check_number
from qrobust.errors import invalid
from qrobust.registry import Registry


@dataclass(frozen=True)
class Context:
    """What a perturbation may need besides the pixels."""

    ids: torch.Tensor  # (N,) int64 sample ids, seed the per-sample noise
    seed: int = 0
    boxes: torch.Tensor | None = None  # (N, 4) x0, y0, x1, y1 in pixels, end exclusive
    model: Callable[[torch.Tensor], torch.Tensor] | None = None  # FP32 model on normalized input (fgsm)
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None
    cache: dict | None = None  # the caller's memo for work that does not depend on the level (fgsm's gradient)


@dataclass(frozen=True)
class Perturbation:
    name: str
    fn: Callable[[torch.Tensor, float, Context], torch.Tensor]
    unit: str  # what the level means
    levels: tuple[float, ...]  # the default sweep, starting at 0
    tags: tuple[str, ...]
    needs_model: bool = False
    max_level: float | None = None  # levels above are meaningless (e.g. jpeg quality below 1)
    integer: bool = False  # levels are whole numbers (streak counts)

    def check_level(self, level) -> float:
        """The level as a float, or InvalidArgument naming what is wrong with it."""
        level = check_level(level)
        if self.integer and level != int(level):
            raise invalid("level", level, f"{self.name} levels are whole numbers ({self.unit})")
        if self.max_level is not None and level > self.max_level:
            raise invalid("level", level, f"{self.name} levels run from 0 to {self.max_level:g} ({self.unit})")
        return level


PERTURBATIONS: Registry[Perturbation] = Registry("perturbation")


def register(name: str, unit: str, levels, tags, needs_model: bool = False, max_level: float | None = None,
             integer: bool = False):
    """Decorator registering ``fn(images, level, ctx)`` as perturbation ``name``."""

    def deco(fn):
        spec = Perturbation(name, fn, unit, tuple(levels), tuple(tags), needs_model, max_level, integer)
        PERTURBATIONS.register(name, spec, tags)
        return fn

    return deco


def sample_generator(seed: int, sample_id: int, name: str, level: float) -> torch.Generator:
    """A generator seeded by (seed, sample id, perturbation, level) only."""
    key = f"{int(seed)}|{int(sample_id)}|{name}|{float(level)!r}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)


def _per_sample(images: torch.Tensor, ctx: Context, name: str, level: float, draw) -> torch.Tensor:
    """Stack ``draw(generator, shape)`` over samples, each from its own seeded generator (a float64 draw
    is rounded once to the images' dtype here)."""
    shape = images.shape[1:]
    noise = [draw(sample_generator(ctx.seed, i, name, level), shape) for i in ctx.ids.tolist()]
    return torch.stack(noise).to(device=images.device, dtype=images.dtype)


TRUNCATION = 3.0  # awgn's noise is cut at +-3 sigma (seed 004)
_ERF_CUT = math.erf(TRUNCATION / math.sqrt(2))


def truncated_normal(generator: torch.Generator, shape) -> torch.Tensor:
    """Standard normal values cut at +-TRUNCATION, by the inverse CDF of float64 uniforms: erfinv of a
    uniform on (erf(-3/sqrt 2), erf(3/sqrt 2)), times sqrt 2 (five times faster than torch's
    trunc_normal_ in float64, the same distribution)."""
    u = torch.rand(shape, dtype=torch.float64, generator=generator)
    return torch.erfinv(_ERF_CUT * (2 * u - 1)) * math.sqrt(2)


@register("awgn", unit="sigma (pixel units)", levels=(0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6), tags=("noise",))
def awgn(images, level, ctx):
    """Additive white Gaussian noise, truncated at +-3 sigma (seed 004), then clipped to [0, 1]."""
    noise = _per_sample(images, ctx, "awgn", level, truncated_normal)
    return (images + level * noise).clamp_(0, 1)


def ordered_mean(values: torch.Tensor) -> torch.Tensor:
    """Means over the last dimension in float64, summed left to right: the same bits on every CPU, where a
    vectorized reduction's order, and so its last bits, depend on the vector width. The running sum is a
    prefix sum (``numpy.cumsum``), whose order its definition fixes."""
    rows = values.detach().double().cpu().reshape(-1, values.shape[-1]).numpy()
    return torch.from_numpy(np.cumsum(rows, axis=-1)[:, -1] / rows.shape[-1]).reshape(values.shape[:-1])


def brownian_field(white: torch.Tensor) -> torch.Tensor:
    """Seed 004's Brownian field from white noise (..., H, W): B = W / (fx^2 + fy^2), DC removed, unit std.

    Dividing the spectrum by f^2 makes the amplitude spectrum fall as 1/f^2 (seed 004 eq. 2.13, which
    calls it "1/f^2" noise); its power spectrum therefore falls as 1/f^4. Computed in float64 with
    numpy's FFT (no run-time CPU dispatch, unlike MKL's) and an exactly summed deviation.
    """
    h, w = white.shape[-2:]
    f2 = np.fft.fftfreq(w)[None, :] ** 2 + np.fft.fftfreq(h)[:, None] ** 2
    f2[0, 0] = 1.0
    spectrum = np.fft.fft2(white.double().numpy()) / f2
    spectrum[..., 0, 0] = 0
    field = torch.from_numpy(np.ascontiguousarray(np.fft.ifft2(spectrum).real))
    flat = field.flatten(-2)
    centred = flat - ordered_mean(flat)[..., None]
    std = (ordered_mean(centred * centred) * (flat.shape[-1] / max(1, flat.shape[-1] - 1))).sqrt().clamp_min(1e-12)
    return field / std[..., None, None]


@register("brownian", unit="sigma (pixel units)", levels=(0, 0.05, 0.1, 0.2, 0.3, 0.4), tags=("noise",))
def brownian(images, level, ctx):
    """Spatially correlated noise with a 1/f^2 amplitude spectrum, per channel, rescaled to std sigma.

    Seed 004 used sigma 10-80 on an unnormalized scale; here the field is rescaled to standard deviation
    sigma in pixel units, so brownian sigma is comparable with awgn sigma.
    """
    noise = _per_sample(images, ctx, "brownian", level,
                        lambda g, s: brownian_field(torch.randn(s, generator=g, dtype=torch.float64)))
    return (images + level * noise).clamp_(0, 1)


def streak_spans(start: float, length: float, count: int) -> list[tuple[int, int]]:
    """[begin, end) pixel spans of ``count`` evenly spaced streaks, 2% of ``length`` wide, in a box."""
    width = max(1, round(0.02 * length))
    spans = []
    for i in range(count):
        centre = start + (i + 1) * length / (count + 1)
        begin = int(math.floor(centre - width / 2 + 0.5))
        begin = min(max(begin, int(start)), int(start + length) - width)
        spans.append((begin, begin + width))
    return spans


def _occlude(images, level, ctx, vertical: bool):
    k = int(level)
    out = images.clone()
    n, _, h, w = images.shape
    boxes = ctx.boxes if ctx.boxes is not None else torch.tensor([[0, 0, w, h]] * n)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
        if vertical:
            for a, b in streak_spans(x0, x1 - x0, k):
                out[i, :, y0:y1, a:b] = 0
        else:
            for a, b in streak_spans(y0, y1 - y0, k):
                out[i, :, a:b, x0:x1] = 0
    return out


@register("occlusion_vertical", unit="number of streaks", levels=(0, 1, 2, 3, 4, 5, 6), tags=("occlusion",),
          integer=True)
def occlusion_vertical(images, level, ctx):
    """Black vertical streaks, 2% of the box width each, evenly spaced across the object box (seed 004)."""
    return _occlude(images, level, ctx, vertical=True)


@register("occlusion_horizontal", unit="number of streaks", levels=(0, 1, 2, 3, 4, 5, 6), tags=("occlusion",),
          integer=True)
def occlusion_horizontal(images, level, ctx):
    """Black horizontal streaks, 2% of the box height each, evenly spaced down the object box."""
    return _occlude(images, level, ctx, vertical=False)


def _taps(x: torch.Tensor, weights: list[float], dim: int, size: int) -> torch.Tensor:
    """``sum_k weights[k] * x.narrow(dim, k, size)``, one IEEE multiply and add per tap in this order: the
    same bits on every CPU (a convolution kernel's summation order and fused multiply-adds are not)."""
    out = None
    for k, weight in enumerate(weights):
        term = x.narrow(dim, k, size) * weight
        out = term if out is None else out + term
    return out


@register("gaussian_blur", unit="sigma (pixels)", levels=(0, 0.5, 1.0, 1.5, 2.0, 3.0), tags=("blur",))
def gaussian_blur(images, level, ctx):
    """Separable Gaussian blur, kernel radius ceil(3 sigma), reflect padding. The weights are computed in
    float64 and summed exactly, then rounded to float32; the taps are summed in a fixed order."""
    radius = max(1, math.ceil(3 * level))
    radius = min(radius, images.shape[-1] - 1, images.shape[-2] - 1)
    raw = [math.exp(-(t * t) / (2 * level * level)) for t in range(-radius, radius + 1)]
    weights = [float(np.float32(w / math.fsum(raw))) for w in raw]
    h, w = images.shape[-2:]
    x = _taps(F.pad(images, (radius, radius, 0, 0), mode="reflect"), weights, -1, w)
    x = _taps(F.pad(x, (0, 0, radius, radius), mode="reflect"), weights, -2, h)
    return x.clamp_(0, 1)


@register("impulse_noise", unit="fraction of values replaced (salt and pepper)",
          levels=(0, 0.01, 0.03, 0.06, 0.09, 0.17, 0.27), tags=("noise",), max_level=1)
def impulse_noise(images, level, ctx):
    """Salt-and-pepper noise as scikit-image's ``random_noise(mode="s&p")`` (ImageNet-C's impulse noise):
    each value (pixel and channel) is replaced with probability ``level``, by 1 or 0 with equal odds."""
    def draw(generator, shape):
        u = torch.rand((2, *shape), generator=generator)
        return torch.where(u[0] < level, (u[1] < 0.5).float(), torch.full(shape, -1.0))

    replace = _per_sample(images, ctx, "impulse_noise", level, draw)
    return torch.where(replace >= 0, replace, images)


# ImageNet-C's glass blur per severity: (blur sigma, largest pixel shift, shuffle iterations)
GLASS_BLUR = {1: (0.7, 1, 2), 2: (0.9, 2, 1), 3: (1.0, 2, 3), 4: (1.1, 3, 2), 5: (1.5, 4, 2)}


@register("glass_blur", unit="ImageNet-C severity (blur, local pixel shuffle, blur)", levels=(0, 1, 2, 3, 4, 5),
          tags=("blur",), max_level=5, integer=True)
def glass_blur(images, level, ctx):
    """Hendrycks and Dietterich's glass blur: Gaussian blur, 8-bit quantization, local shuffles within
    +-shift, blur again. The shuffle is vectorized: per iteration every pixel reads a random neighbour
    (offset in [-shift, shift), as theirs draws it) instead of their sequential in-place swaps, which take
    seconds per 224-px image in Python; tests compare the two on the statistics that matter."""
    sigma, shift, iterations = GLASS_BLUR[int(level)]
    x = (gaussian_blur(images, sigma, ctx) * 255).floor_() / 255
    n, _, height, width = x.shape
    rows = torch.arange(height).view(1, height, 1)
    cols = torch.arange(width).view(1, 1, width)
    for i in range(iterations):
        offsets = _per_sample(torch.empty(n, 2, height, width), ctx, "glass_blur", level * 10 + i,
                              lambda g, s: torch.randint(-shift, shift, s, generator=g).float()).long()
        r = (rows + offsets[:, 0]).clamp_(0, height - 1)
        c = (cols + offsets[:, 1]).clamp_(0, width - 1)
        flat = (r * width + c).view(n, 1, -1).expand(-1, x.shape[1], -1).to(x.device)
        x = x.flatten(2).gather(2, flat).view_as(x)
    return gaussian_blur(x, sigma, ctx)


def _linear(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Linear resampling of ``dim`` to ``size`` as ``F.interpolate(mode="bilinear", align_corners=False,
    antialias=False)`` defines it (source = (i + 0.5) * in / out - 0.5, clamped at 0), with the two taps'
    weights computed in float64 and each output summed as ``a * w0 + b * w1``: the same bits on every
    CPU (torch's kernel differs between vector widths and thread counts)."""
    length = x.shape[dim]
    low, high, weights = [], [], []
    for i in range(size):
        source = max(0.0, (i + 0.5) * length / size - 0.5)
        first = min(int(source), length - 1)
        low.append(first)
        high.append(min(first + 1, length - 1))
        weights.append(source - first)
    shape = [1] * x.dim()
    shape[dim] = size
    near, far = (torch.tensor(w, dtype=torch.float64).to(x).view(shape) for w in ([1 - v for v in weights], weights))
    index = {k: torch.tensor(v, device=x.device) for k, v in (("low", low), ("high", high))}
    return x.index_select(dim, index["low"]) * near + x.index_select(dim, index["high"]) * far


def _resized(images: torch.Tensor, level: float, mode: str) -> torch.Tensor:
    """Down to ``1 - level`` of the size and back up with ``mode``, no antialiasing: a deployment
    pipeline that resizes differently from training."""
    height, width = images.shape[-2:]
    small = (max(1, round(height * (1 - level))), max(1, round(width * (1 - level))))
    if mode == "nearest":
        down = F.interpolate(images, size=small, mode=mode)
        return F.interpolate(down, size=(height, width), mode=mode).clamp_(0, 1)
    down = _linear(_linear(images, small[0], -2), small[1], -1)
    return _linear(_linear(down, height, -2), width, -1).clamp_(0, 1)


RESIZE_UNIT = "downscale fraction (to 1 - level and back: 0.5, 0.75, 0.875 are 2x, 4x, 8x)"


@register("resize_nearest", unit=RESIZE_UNIT, levels=(0, 0.5, 0.75, 0.875, 0.9375),
          tags=("systematic",), max_level=0.95)
def resize_nearest(images, level, ctx):
    """Nearest-neighbour down- and upscaling (RobustMQ's most harmful systematic noise)."""
    return _resized(images, level, "nearest")


@register("resize_bilinear", unit=RESIZE_UNIT, levels=(0, 0.5, 0.75, 0.875, 0.9375),
          tags=("systematic",), max_level=0.95)
def resize_bilinear(images, level, ctx):
    """Bilinear down- and upscaling without antialiasing (OpenCV's and PIL-less pipelines' default)."""
    return _resized(images, level, "bilinear")


@register("jpeg", unit="100 - JPEG quality", levels=(0, 50, 70, 80, 90, 95), tags=("digital",), max_level=99)
def jpeg(images, level, ctx):
    """JPEG round trip at quality 100 - level (libjpeg via Pillow); level 0 is no compression."""
    import io

    import numpy as np
    from PIL import Image

    quality = int(round(100 - level))
    pixels = (images.detach().cpu() * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for img in pixels:
        buffer = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buffer, format="JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
        out.append(torch.from_numpy(decoded.reshape(img.shape).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).to(device=images.device, dtype=images.dtype) / 255


@register("contrast", unit="contrast reduction (0 = none, 1 = flat)", levels=(0, 0.2, 0.4, 0.6, 0.8),
          tags=("digital",), max_level=1)
def contrast(images, level, ctx):
    """Blend each image towards its per-channel mean: x' = m + (1 - level)(x - m)."""
    mean = ordered_mean(images.flatten(-2)).to(images)[..., None, None]
    return (mean + (1 - level) * (images - mean)).clamp_(0, 1)


@register("brightness", unit="added intensity (pixel units)", levels=(0, 0.1, 0.2, 0.3, 0.4, 0.5), tags=("digital",))
def brightness(images, level, ctx):
    """Add a constant intensity, clipped to [0, 1]."""
    return (images + level).clamp_(0, 1)


FGSM_DEAD_BAND = 1e-9  # gradients within this fraction of the sample's largest |gradient| count as 0


def cross_entropy_gradient(logits: torch.Tensor) -> torch.Tensor:
    """d/dlogits of the summed cross-entropy against each sample's own top-1: softmax minus one-hot, the
    top-1 entry as minus the sum of the other probabilities (no cancellation in 1 - p)."""
    p = torch.softmax(logits, dim=1)
    target = logits.argmax(dim=1, keepdim=True)
    others = p.scatter(1, target, 0.0).sum(dim=1, keepdim=True)
    return p.scatter(1, target, -others)


@register("fgsm", unit="epsilon (pixel units)", levels=(0, 0.01, 0.02, 0.05, 0.1), tags=("adversarial",),
          needs_model=True)
def fgsm(images, level, ctx):
    """Fast gradient sign attack on the FP32 model, against its own prediction; both models see the result.

    The loss is summed over the batch so each sample's gradient is independent of its batch mates. The
    gradient's sign is taken with a dead band: a pixel whose gradient is within ``FGSM_DEAD_BAND`` of
    the sample's largest is not moved. The gate's ``ctx.model`` computes in float64 (a copy of the FP32
    model): a float32 gradient's sign near 0 is rounding noise that differs between CPUs (summation
    order, vector width), in float64 that noise is ~1e-15 of the largest gradient, far inside the band,
    so every host moves the same pixels the same way. The loss's gradient at the logits is softmax minus
    one-hot, with the predicted class's entry written as minus the sum of the others: computed as
    p - 1, a confidently classified digit's whole gradient was rounding noise of 1 - p (1e-14), and
    an AVX-512 host and ATen's scalar kernels moved 23 of its pixels in opposite directions.
    """
    key = ("fgsm", tuple(ctx.ids.tolist()))
    direction = ctx.cache.get(key) if ctx.cache is not None else None
    if direction is None:  # the sign does not depend on epsilon: one gradient per batch serves every level
        x = images.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = ctx.model(ctx.normalize(x))
            grad, = torch.autograd.grad(logits, x, grad_outputs=cross_entropy_gradient(logits.detach()))
        band = FGSM_DEAD_BAND * grad.abs().flatten(1).amax(dim=1).view(-1, *[1] * (grad.dim() - 1))
        direction = torch.where(grad.abs() > band, grad.sign(), torch.zeros_like(grad)).to(torch.int8)
        if ctx.cache is not None:
            ctx.cache[key] = direction
    return (images + level * direction.to(images.dtype)).clamp_(0, 1).detach()


# ImageNet-C's severities 1-5 in qrobust's levels, for the families both have (Hendrycks and Dietterich,
# ICLR 2019; the imagecorruptions package). Differences: awgn truncates its noise at 3 sigma, gaussian_blur
# cuts its kernel at 3 sigma (theirs at 4), brightness adds in RGB (theirs in HSV value): close, not equal.
IMAGENET_C = {
    "awgn": (0.08, 0.12, 0.18, 0.26, 0.38),            # gaussian_noise: sigma
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),   # impulse_noise: s&p amount
    "gaussian_blur": (1, 2, 3, 4, 6),                  # gaussian_blur: sigma (pixels at 224 px)
    "glass_blur": (1, 2, 3, 4, 5),                     # glass_blur: the severity itself
    "jpeg": (75, 82, 85, 90, 93),                      # jpeg_compression: 100 - quality (25, 18, 15, 10, 7)
    "contrast": (0.6, 0.7, 0.8, 0.9, 0.95),            # contrast: 1 - their factor (0.4 ... 0.05)
}


def check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise invalid("images", shape, "expected a (N, C, H, W) tensor")
    if not images.is_floating_point():
        raise invalid("images", images.dtype, "expected float pixels in [0, 1]")
    if images.numel() and (not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1):
        raise invalid("images", "<tensor>", "pixels must be finite and in [0, 1] (perturb before normalizing)")


def check_level(level) -> float:
    return check_number("level", level, minimum=0)


def perturb(name: str, images: torch.Tensor, level: float, *, ids=None, seed: int = 0, boxes=None,
            model=None, normalize=None, cache: dict | None = None) -> torch.Tensor:
    """Apply perturbation ``name`` at ``level``; ``ids`` default to 0..N-1 (pass real ids for datasets).
    ``cache`` keeps level-independent work (fgsm's gradient sign) between levels of the same samples."""
    spec = PERTURBATIONS.get(name)
    check_images(images)
    level = spec.check_level(level)
    ids = torch.arange(images.shape[0]) if ids is None else torch.as_tensor(ids)
    if ids.shape != (images.shape[0],):
        raise invalid("ids", tuple(ids.shape), f"expected one id per image ({images.shape[0]})")
    if spec.needs_model and (model is None or normalize is None):
        raise invalid("model", model, f"perturbation {name!r} needs the FP32 model and its normalize")
    if level == 0:
        return images.clone()
    return spec.fn(images, level, Context(ids, seed, boxes, model, normalize, cache))
