"""Every registered perturbation through one shared checker, plus family-specific checks."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st
import torch
from torch import nn

from qrobust.data import perturbations as P
from qrobust.errors import InvalidArgument


def images(n=6, c=3, h=32, w=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(n, c, 1, 1, generator=gen) * 0.6 + 0.2
    return (base + 0.15 * torch.rand(n, c, h, w, generator=gen)).clamp(0, 1)


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


def kwargs_for(name):
    if PERTURBATIONS_NEEDING_MODEL.get(name):
        return {"model": tiny_model(), "normalize": lambda x: (x - 0.5) / 0.25}
    return {}


PERTURBATIONS_NEEDING_MODEL = {n: P.PERTURBATIONS.get(n).needs_model for n in P.PERTURBATIONS.names()}
ALL = P.PERTURBATIONS.names()
PUBLISHED_SEVERITIES = {"glass_blur"}  # levels are ImageNet-C's severities, kept as published


def test_the_required_families_are_registered_with_tags():
    required = {"awgn", "brownian", "occlusion_vertical", "occlusion_horizontal", "gaussian_blur", "jpeg",
                "contrast", "brightness", "fgsm", "impulse_noise", "glass_blur", "resize_nearest", "resize_bilinear"}
    assert required <= set(ALL)
    assert set(P.PERTURBATIONS.names("noise")) == {"awgn", "brownian", "impulse_noise"}
    assert set(P.PERTURBATIONS.names("systematic")) == {"resize_nearest", "resize_bilinear"}
    assert P.PERTURBATIONS.names("adversarial") == ["fgsm"]
    for name in ALL:
        assert len(P.PERTURBATIONS.get(name).levels) >= 5 and P.PERTURBATIONS.get(name).levels[0] == 0


def photo_crops(n=6, size=32):
    """Crops of a natural photo: distortion must grow with the level on real image statistics (blur and
    resizing barely move flat noise)."""
    from skimage.data import astronaut

    photo = torch.from_numpy(astronaut() / 255.0).float().permute(2, 0, 1)
    return torch.stack([photo[:, 40 * i + 60:40 * i + 60 + size, 50 * i + 100:50 * i + 100 + size] for i in range(n)])


@pytest.mark.parametrize("name", ALL)
def test_shared_contract(name):
    x = photo_crops()
    before = x.clone()
    kw = kwargs_for(name)
    ids = torch.arange(100, 100 + len(x))
    levels = [lv for lv in P.PERTURBATIONS.get(name).levels if lv > 0]
    distortion = []
    for level in levels:
        out = P.perturb(name, x, level, ids=ids, seed=7, **kw)
        assert torch.equal(x, before), "input modified in place"
        assert out.dtype == x.dtype and out.device == x.device and out.shape == x.shape
        assert out.min() >= 0 and out.max() <= 1
        again = P.perturb(name, x, level, ids=ids, seed=7, **kw)
        assert torch.equal(out, again), "same seed must give identical bytes"
        one_by_one = torch.cat([P.perturb(name, x[i:i + 1], level, ids=ids[i:i + 1], seed=7, **kw)
                                for i in range(len(x))])
        assert torch.allclose(out, one_by_one, atol=1e-6, rtol=0), "batched differs from one-by-one"
        reordered = P.perturb(name, x.flip(0), level, ids=ids.flip(0), seed=7, **kw).flip(0)
        assert torch.allclose(out, reordered, atol=1e-6, rtol=0), "depends on batch order"
        distortion.append(((out - x) ** 2).mean().item())
    assert torch.equal(P.perturb(name, x, 0, ids=ids, **kw), x), "level 0 must be the identity"
    assert distortion[0] > 0
    if name in PUBLISHED_SEVERITIES:  # ImageNet-C's table: severity 2 shuffles once, 1 twice; only the ends order
        assert distortion[-1] > distortion[0], distortion
    else:
        assert all(b >= a * 0.98 for a, b in zip(distortion, distortion[1:])), f"distortion not growing: {distortion}"


@pytest.mark.parametrize("name", ["awgn", "brownian"])
def test_other_seed_or_sample_gives_other_noise(name):
    x = images(n=2)
    a = P.perturb(name, x, 0.1, ids=[0, 1], seed=0)
    assert not torch.equal(a, P.perturb(name, x, 0.1, ids=[0, 1], seed=1))
    assert not torch.equal(a[0], P.perturb(name, x[1:], 0.1, ids=[0], seed=0)[0] - x[1] + x[0])


def test_awgn_noise_has_std_sigma_and_never_exceeds_three_sigma():
    x = torch.full((4, 3, 64, 64), 0.5)
    sigma = 0.05  # small enough that nothing clips
    noise = P.perturb("awgn", x, sigma, seed=3) - x
    assert noise.abs().max() <= 3 * sigma + 1e-6
    # a N(0, 1) truncated at +-3 has std 0.9865
    assert noise.std().item() == pytest.approx(0.9865 * sigma, rel=0.02)
    assert noise.mean().item() == pytest.approx(0, abs=0.002)


def radial_spectrum_slope(field: np.ndarray, which: str) -> float:
    f = np.abs(np.fft.fft2(field)) ** (2 if which == "power" else 1)
    h, w = field.shape
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    r = np.sqrt(fx**2 + fy**2)
    bins = np.linspace(2 / h, 0.4, 20)
    centres, means = [], []
    for lo, hi in zip(bins, bins[1:]):
        m = (r >= lo) & (r < hi)
        centres.append(np.sqrt(lo * hi))
        means.append(f[m].mean())
    return np.polyfit(np.log(centres), np.log(means), 1)[0]


def test_brownian_field_has_a_one_over_f_squared_amplitude_spectrum_and_std_sigma():
    x = torch.full((8, 1, 128, 128), 0.5)
    sigma = 0.02
    noise = (P.perturb("brownian", x, sigma, seed=1) - x)[:, 0].numpy()
    slopes = [radial_spectrum_slope(n, "amplitude") for n in noise]
    assert np.mean(slopes) == pytest.approx(-2.0, abs=0.15)
    assert np.mean([radial_spectrum_slope(n, "power") for n in noise]) == pytest.approx(-4.0, abs=0.3)
    assert noise.std(axis=(1, 2)).mean() == pytest.approx(sigma, rel=0.05)
    assert abs(noise.mean()) < sigma * 0.05  # DC removed


@pytest.mark.parametrize("vertical", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_occlusion_streak_count_width_and_position_inside_the_box(vertical, k):
    x = torch.ones(1, 3, 120, 200)
    box = torch.tensor([[40, 10, 190, 110]])  # 150 wide, 100 high
    name = "occlusion_vertical" if vertical else "occlusion_horizontal"
    out = P.perturb(name, x, k, boxes=box)
    black = (out[0, 0] == 0)
    assert not black[:10].any() and not black[110:].any() and not black[:, :40].any() and not black[:, 190:].any()
    profile = black[10:110].all(dim=0) if vertical else black[:, 40:190].all(dim=1)
    runs = np.diff(np.concatenate([[0], profile.int().numpy(), [0]]))
    starts, ends = np.flatnonzero(runs == 1), np.flatnonzero(runs == -1)
    expected_width = round(0.02 * (150 if vertical else 100))
    assert len(starts) == k
    assert all(e - s == expected_width for s, e in zip(starts, ends))
    origin, length = (40, 150) if vertical else (10, 100)
    for i, (s, e) in enumerate(zip(starts, ends)):
        assert abs((s + e) / 2 - (origin + (i + 1) * length / (k + 1))) <= 1
    # each streak spans the whole box across
    span = black[10:110, starts[0]] if vertical else black[starts[0], 40:190]
    assert span.all()


def test_occlusion_without_box_uses_the_whole_image_and_minimum_width_one():
    out = P.perturb("occlusion_vertical", torch.ones(1, 1, 32, 32), 3)
    assert (out[0, 0] == 0).all(dim=0).sum() == 3


def test_fgsm_moves_every_pixel_by_epsilon_where_not_clipped_and_raises_loss():
    model, norm = tiny_model(), (lambda x: (x - 0.5) / 0.25)
    x = images(n=4)
    out = P.perturb("fgsm", x, 0.03, model=model, normalize=norm)
    delta = (out - x).abs()
    inside = (out > 0) & (out < 1)
    moved = (delta[inside] - 0.03).abs() < 1e-6
    assert (moved | (delta[inside] == 0)).all()  # sign(0) = 0 leaves a pixel where the gradient vanishes
    assert moved.float().mean() > 0.9
    target = model(norm(x)).argmax(1)
    loss = torch.nn.functional.cross_entropy
    assert loss(model(norm(out)), target) > loss(model(norm(x)), target)


@given(st.integers(2, 12), st.floats(0.1, 60), st.integers(0, 2**31 - 1))
def test_fgsm_loss_gradient_is_autograd_of_cross_entropy_without_its_cancellation(classes, scale, seed):
    """The oracle: PyTorch's autograd of F.cross_entropy against the top-1. Where the top-1 is all but
    certain (large logits), 1 - p cancels; the stable form stays exactly -(sum of the others) and keeps
    every entry's sign."""
    logits = torch.randn(5, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    leaf = logits.clone().requires_grad_(True)
    expected, = torch.autograd.grad(torch.nn.functional.cross_entropy(leaf, logits.argmax(1), reduction="sum"), leaf)
    got = P.cross_entropy_gradient(logits)
    assert torch.allclose(got, expected, rtol=0, atol=1e-15)
    top = logits.argmax(1)
    assert torch.equal(got.gather(1, top[:, None]).squeeze(1), -got.scatter(1, top[:, None], 0.0).sum(1))
    assert (got.scatter(1, top[:, None], 0.0) >= 0).all()


def test_jpeg_level_is_one_hundred_minus_quality():
    x = images(n=1)
    assert ((P.perturb("jpeg", x, 90) - x) ** 2).mean() > ((P.perturb("jpeg", x, 10) - x) ** 2).mean()
    with pytest.raises(InvalidArgument, match="level=100.0: jpeg levels run from 0 to 99"):
        P.perturb("jpeg", x, 100)


def test_unknown_name_lists_close_matches():
    with pytest.raises(InvalidArgument, match=r"perturbation='awgm'.*did you mean 'awgn'"):
        P.perturb("awgm", images(), 0.1)


@pytest.mark.parametrize("level", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_levels(level):
    with pytest.raises(InvalidArgument, match="^level="):
        P.perturb("awgn", images(), level)


@pytest.mark.parametrize("bad", [torch.rand(3, 8, 8), torch.rand(1, 3, 8, 8) * 255, torch.full((1, 1, 4, 4), -0.5),
                                 torch.full((1, 1, 4, 4), float("nan")), torch.ones(1, 1, 4, 4, dtype=torch.uint8)])
def test_bad_images(bad):
    with pytest.raises(InvalidArgument, match="^images="):
        P.perturb("awgn", bad, 0.1)


def test_fractional_streak_count_and_fgsm_without_model_are_refused():
    with pytest.raises(InvalidArgument, match="level=1.5: occlusion_vertical levels are whole numbers"):
        P.perturb("occlusion_vertical", images(), 1.5)
    with pytest.raises(InvalidArgument, match="needs the FP32 model"):
        P.perturb("fgsm", images(), 0.1)
    with pytest.raises(InvalidArgument, match="ids="):
        P.perturb("awgn", images(n=3), 0.1, ids=[1, 2])


def test_sample_seed_derivation_never_changes_silently():
    # baselines and reports rest on these exact streams: a change here must be deliberate
    g = P.sample_generator(0, 42, "awgn", 0.1)
    assert torch.randint(0, 2**31, (3,), generator=g).tolist() == [1275358697, 1250340193, 1876701142]
    assert math.isfinite(P.brownian_field(torch.zeros(1, 8, 8)).sum().item())


# ---- the families RobustMQ found hurt quantized models most, against their reference implementations ----------
def test_impulse_noise_replaces_values_like_scikit_images_salt_and_pepper():
    """ImageNet-C's impulse noise is scikit-image's random_noise(mode="s&p"): the same shares of 0s and 1s."""
    from skimage.util import random_noise

    x = images(n=8, h=64, w=64)  # values in (0.2, 0.95): a 0 or a 1 is noise
    for amount in (0.03, 0.17):
        ours = P.perturb("impulse_noise", x, amount, seed=3)
        theirs = torch.from_numpy(random_noise(x.numpy(), mode="s&p", amount=amount, rng=0))
        n = x.numel()
        for value in (0.0, 1.0):
            a, b = (ours == value).sum().item() / n, (theirs == value).sum().item() / n
            sd = math.sqrt(amount / 2 * (1 - amount / 2) / n)
            assert abs(a - amount / 2) < 5 * sd and abs(a - b) < 7 * sd, (amount, value, a, b)
        kept = (ours != 0) & (ours != 1)
        assert torch.equal(ours[kept], x[kept])


def reference_glass_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Hendrycks and Dietterich's algorithm as published: blur, 8-bit, sequential local swaps, blur."""
    from skimage.filters import gaussian

    sigma, shift, iterations = P.GLASS_BLUR[severity]
    x = np.uint8(gaussian(image, sigma=sigma, channel_axis=-1) * 255)
    h, w = x.shape[:2]
    for _ in range(iterations):
        for row in range(h - shift, shift, -1):
            for col in range(w - shift, shift, -1):
                dx, dy = rng.integers(-shift, shift, size=2)
                x[row, col], x[row + dy, col + dx] = x[row + dy, col + dx].copy(), x[row, col].copy()
    return np.clip(gaussian(x / 255.0, sigma=sigma, channel_axis=-1), 0, 1)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_glass_blur_distorts_a_photo_like_the_published_sequential_swaps(severity):
    from skimage.data import astronaut

    photo = torch.from_numpy(astronaut()[100:164, 180:244] / 255.0).float().permute(2, 0, 1)[None]
    ours = P.perturb("glass_blur", photo, severity, seed=0)[0].permute(1, 2, 0).numpy()
    theirs = reference_glass_blur(photo[0].permute(1, 2, 0).numpy(), severity, np.random.default_rng(0))
    clean = photo[0].permute(1, 2, 0).numpy()

    def detail(img):  # high-frequency energy: what glass blur destroys
        return np.abs(np.diff(img, axis=0)).mean() + np.abs(np.diff(img, axis=1)).mean()

    distortion = [np.abs(img - clean).mean() for img in (ours, theirs)]
    assert distortion[0] == pytest.approx(distortion[1], rel=0.25), distortion
    assert detail(ours) == pytest.approx(detail(theirs), rel=0.25)
    assert detail(ours) < 0.8 * detail(clean)


def test_resizing_nearest_repeats_pixels_and_bilinear_smooths_them():
    x = images(n=2, h=32, w=32)
    near = P.perturb("resize_nearest", x, 0.5)
    assert torch.equal(near[..., 0::2, 0::2], near[..., 1::2, 1::2])  # 2 x 2 blocks of one value
    assert torch.equal(near[..., 0::2, :], near[..., 1::2, :])
    blur = P.perturb("resize_bilinear", x, 0.5)
    assert not torch.equal(blur[..., 0::2, :], blur[..., 1::2, :])
    diff = lambda img: (img[..., 1:] - img[..., :-1]).abs().mean()  # noqa: E731
    assert diff(blur) < diff(x)


def test_imagenet_c_severities_are_valid_increasing_levels_of_each_family():
    for name, severities in P.IMAGENET_C.items():
        spec = P.PERTURBATIONS.get(name)
        assert len(severities) == 5 and list(severities) == sorted(severities)
        assert all(spec.check_level(lv) == lv for lv in severities)
    assert P.IMAGENET_C["jpeg"] == tuple(100 - q for q in (25, 18, 15, 10, 7))
