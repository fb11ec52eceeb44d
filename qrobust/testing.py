"""Hypothesis strategies and checkers for users' own tests (pytest-regressions' ``testing.py`` idea).

    from hypothesis import given
    from qrobust.testing import check_perturbation, check_qparams, pixel_batches

    def test_my_perturbation_keeps_the_contract():
        check_perturbation("salt")

    @given(pixel_batches())
    def test_my_qparams(images):
        check_qparams(my_quantizer_qparams(images), images)

Each checker raises ``AssertionError`` with one line saying which property failed and where.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from qrobust.data.perturbations import PERTURBATIONS, perturb
from qrobust.quant.quantizer import QParams, dequantize, quantize


CHANNELS, SIDES, BATCHES = st.sampled_from([1, 3]), st.integers(4, 24), st.integers(1, 6)


@st.composite
def pixel_batches(draw, channels=CHANNELS, size=SIDES, batch=BATCHES):
    """(N, C, H, W) float32 pixels in [0, 1], from a drawn seed (shrinks to small, plain batches)."""
    c, n = draw(channels), draw(batch)
    h, w = draw(size), draw(size)
    seed = draw(st.integers(0, 2**31 - 1))
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def check_perturbation(name: str, images: torch.Tensor | None = None, level: float | None = None,
                       seed: int = 0) -> None:
    """A registered perturbation keeps qrobust's contract on ``images``: level 0 is the identity, the
    input is never modified, outputs are finite pixels in [0, 1] of the same shape, and a sample's pixels
    do not depend on its batch mates or their order (they are seeded by sample id alone)."""
    spec = PERTURBATIONS.get(name)
    if spec.needs_model:
        raise AssertionError(f"{name}: needs a model; check it through a gate case instead")
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) if images is None else images
    level = next((lv for lv in spec.levels if lv > 0), 1.0) if level is None else level
    ids = torch.arange(100, 100 + len(images))
    before = images.clone()
    assert torch.equal(perturb(name, images, 0, ids=ids, seed=seed), images), f"{name}: level 0 is not the identity"
    out = perturb(name, images, level, ids=ids, seed=seed)
    assert torch.equal(images, before), f"{name}: modified its input in place"
    assert out.shape == images.shape, f"{name}: changed the shape {tuple(images.shape)} -> {tuple(out.shape)}"
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1, f"{name} @ {level}: pixels left [0, 1]"
    order = torch.arange(len(images) - 1, -1, -1)
    shuffled = perturb(name, images[order], level, ids=ids[order], seed=seed)[order.argsort()]
    assert torch.equal(shuffled, out), f"{name} @ {level}: a sample's pixels depend on the batch order"
    alone = torch.cat([perturb(name, images[i:i + 1], level, ids=ids[i:i + 1], seed=seed) for i in range(len(images))])
    assert torch.equal(alone, out), f"{name} @ {level}: a sample's pixels depend on its batch mates"


def check_qparams(qparams: QParams, x: torch.Tensor | None = None) -> None:
    """Quantizer properties of ``qparams``: every scale finite and > 0, every zero point a whole number on
    the grid, 0.0 exactly representable, and (given samples ``x``) the round trip within scale / 2 inside
    the representable range and saturated outside it."""
    scale, zero = qparams.scale.double(), qparams.zero_point
    where = "" if qparams.axis is None else f" (axis {qparams.axis})"
    assert torch.isfinite(scale).all() and (scale > 0).all(), f"scale{where}: not finite and > 0: {scale.tolist()}"
    assert not zero.is_floating_point() or torch.equal(zero, zero.round()), f"zero point{where}: not whole"
    assert ((zero >= qparams.q_min) & (zero <= qparams.q_max)).all(), \
        f"zero point{where}: {zero.tolist()} outside the grid [{qparams.q_min}, {qparams.q_max}]"
    per_slice = QParams(qparams.scale, qparams.zero_point, qparams.q_min, qparams.q_max,
                        None if qparams.axis is None else 0)
    zeros = torch.zeros(qparams.scale.numel() if qparams.axis is not None else 1)
    assert torch.equal(dequantize(quantize(zeros, per_slice), per_slice), zeros), \
        f"0.0 is not exactly representable{where}"
    if x is None:
        return
    low, high = qparams.representable
    back = dequantize(quantize(x, qparams), qparams)
    lo, hi = _broadcast(low, x, qparams.axis), _broadcast(high, x, qparams.axis)
    s = _broadcast(qparams.scale, x, qparams.axis)
    inside = (x >= lo) & (x <= hi)
    error = (back - x).abs()
    rounding = 4 * torch.finfo(torch.float32).eps * torch.maximum(x.abs(), back.abs())  # float32 at a half step
    assert (error[inside] <= (s.expand_as(x)[inside] / 2 + rounding[inside])).all(), \
        f"round trip error above scale / 2 inside the range (max {float(error[inside].max()):.3g})"
    clipped = torch.where(x < lo, lo, torch.where(x > hi, hi, x))
    assert torch.allclose(back[~inside], clipped[~inside], atol=float(s.max()) * 1e-6 + 1e-12), \
        "values outside the range do not saturate to its ends"


def _broadcast(values: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return values
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return values.reshape(shape)


__all__ = ["check_perturbation", "check_qparams", "pixel_batches"]
