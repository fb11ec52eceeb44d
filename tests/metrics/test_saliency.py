"""CAM comparison metrics, activation statistics and explanation quality, with oracles and identities."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as sps
from scipy.stats import pearsonr
from sklearn.metrics import mean_squared_error

from qrobust.models import zoo
from qrobust.data import load_dataset
from qrobust.errors import InvalidArgument
from qrobust.explain.quality import box_iou, deletion_insertion, wsol_box, wsol_iou
from qrobust.metrics.saliency import KLD_EPS, activation_stats, cam_cc, cam_kld, cam_rmse, cam_sim

maps_strategy = st.integers(0, 10_000).map(
    lambda s: torch.rand(3, 7, 9, generator=torch.Generator().manual_seed(s)) + 0.01)


@given(maps_strategy)
def test_identities(m):
    assert torch.allclose(cam_sim(m, m), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(cam_cc(m, m), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(cam_kld(m, m), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.equal(cam_rmse(m, m), torch.zeros(3, dtype=torch.float64))


@given(maps_strategy, maps_strategy, st.floats(0.1, 50))
def test_sim_and_cc_are_scale_invariant(a, b, scale):
    # float32 maps: scaling rounds each pixel (relative 6e-8), so compare with an absolute tolerance too
    # (a correlation near 0 has no meaningful relative error)
    assert torch.allclose(cam_sim(a, b), cam_sim(a * scale, b), atol=1e-6)
    assert torch.allclose(cam_cc(a, b), cam_cc(a, b * scale), atol=1e-6)


@given(maps_strategy, maps_strategy)
def test_against_scipy_and_sklearn(a, b):
    for i in range(3):
        x, y = a[i].flatten().numpy(), b[i].flatten().numpy()
        assert cam_cc(a, b)[i].item() == pytest.approx(pearsonr(x, y)[0], abs=1e-6)
        assert cam_rmse(a, b)[i].item() == pytest.approx(np.sqrt(mean_squared_error(x, y)), rel=1e-5)
        r, c = x / x.sum(), y / y.sum()
        assert cam_kld(a, b)[i].item() == pytest.approx(np.sum(r * np.log(KLD_EPS + r / (c + KLD_EPS))), rel=1e-5)


def test_hand_computed_cases():
    p = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    q = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    half = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert cam_sim(p, q).item() == 0.0 and cam_sim(p, half).item() == pytest.approx(0.5)
    assert cam_rmse(p, q).item() == pytest.approx(np.sqrt(0.5))
    assert cam_cc(p, q).item() == pytest.approx(-1 / 3)
    # R = (1, 0, 0, 0), C = (0.5, 0.5, 0, 0): KLD = log(2)
    assert cam_kld(p, half).item() == pytest.approx(np.log(2), rel=1e-9)


def test_activation_stats():
    a = torch.tensor([0.0, 0.0, 1.0, 3.0])
    out = activation_stats(a, a)
    assert out["dice"] == pytest.approx(1.0)
    assert out["fp32"]["sparsity"] == 50.0 and out["fp32"]["std"] == pytest.approx(float(a.std()))
    # three occupied bins with probabilities 1/2, 1/4, 1/4: entropy 1.5 bits
    assert out["fp32"]["entropy"] == pytest.approx(1.5, abs=1e-6)
    disjoint = activation_stats(torch.zeros(10), torch.ones(10))
    assert disjoint["dice"] == 0.0 and len(disjoint["histograms"]["fp32"]) == 256


def test_wsol_box_and_iou():
    m = torch.zeros(10, 10)
    m[2:5, 3:7] = 1.0
    m[8, 8] = 1.0  # a smaller blob that must lose to the largest component
    assert wsol_box(m) == (3, 2, 7, 5)
    assert box_iou((3, 2, 7, 5), (3, 2, 7, 5)) == 1.0
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert wsol_iou(m[None], None) is None
    assert wsol_iou(m[None], torch.tensor([[3, 2, 7, 5]])).tolist() == [1.0]
    with pytest.raises(InvalidArgument, match="threshold="):
        wsol_box(m, 1.5)


def test_deletion_of_an_oracle_map_beats_a_random_map_on_lenet():
    model, pre = zoo.lenet5_digits(), zoo.DIGITS_PREPROCESS
    data = load_dataset("digits-test")
    images = data.images[:12]
    targets = model(pre.normalize(images)).argmax(1)
    oracle = images[:, 0]  # the pen strokes themselves: deleting them first destroys the digit
    random = torch.rand(oracle.shape, generator=torch.Generator().manual_seed(0))
    good = deletion_insertion(model, pre.normalize, images, oracle, targets, steps=20)
    bad = deletion_insertion(model, pre.normalize, images, random, targets, steps=20)
    assert good.deletion_auc.mean() < bad.deletion_auc.mean() - 0.1
    # (insertion barely separates them here: a 1-px blur of a 32-px digit is still readable)
    assert good.deletion_curves.shape == (12, 21)
    assert torch.allclose(good.deletion_curves[:, 0], good.insertion_curves[:, -1], atol=1e-5)  # both = clean


def test_deletion_rejects_mismatched_maps():
    with pytest.raises(InvalidArgument, match="maps="):
        deletion_insertion(zoo.lenet5_digits(), zoo.DIGITS_PREPROCESS.normalize, torch.zeros(2, 1, 32, 32),
                           torch.zeros(2, 16, 16), torch.zeros(2, dtype=torch.long))


def test_cam_agreement_keeps_the_most_different_subset_and_counts_degenerate_maps():
    from qrobust.metrics import CamAgreement
    from qrobust.metrics.stats import poisson_weights

    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(40, 8, 8, generator=gen)
    cand = ref.clone()
    cand[[3, 17]] = 1 - cand[[3, 17]]  # two images whose quantized map is inverted
    degenerate = torch.zeros(40, dtype=torch.bool)
    degenerate[5] = True
    ids = torch.arange(100, 140)
    state = CamAgreement("eigencam", replicates=50, capacity=2)
    for part in torch.arange(40).split(16):  # streamed in batches
        state.update((ref[part], degenerate[part]), (cand[part], torch.zeros(len(part), dtype=torch.bool)),
                     ids[part], poisson_weights(0, ids[part], 50), torch.rand(len(part), 1, 8, 8))
    results = state.results()
    assert [i for _, i in results["cam_rmse"].details["top_0.05_by_rmse"]] in ([103, 117], [117, 103])
    assert results["cam_sim"].details["degenerate"] == {"fp32": 1, "quantized": 0, "both": 0}
    assert results["cam_sim"].n == 39 and {o["id"] for o in state.overlays} == {103, 117}


def test_cam_agreement_trims_kld_and_averages_the_bounded_metrics():
    """One image with a near-disjoint quantized map decides a mean KLD, not the trimmed one."""
    from qrobust.metrics import CamAgreement
    from qrobust.metrics.stats import poisson_weights

    gen = torch.Generator().manual_seed(1)
    ref = torch.rand(30, 8, 8, generator=gen)
    cand = (ref + 0.05 * torch.rand(30, 8, 8, generator=gen)).clamp(0, 1)
    cand[7] = 0.0
    cand[7, 0, 0] = 1.0  # all of the quantized map's mass in one cell
    ids, ok = torch.arange(30), torch.zeros(30, dtype=torch.bool)
    state = CamAgreement("eigencam", replicates=100)
    state.update((ref, ok), (cand, ok), ids, poisson_weights(0, ids, 100), torch.rand(30, 1, 8, 8))
    results = state.results()
    per_image = cam_kld(ref, cand).numpy()
    assert per_image[7] > 20 * np.median(per_image)
    assert results["cam_kld"].value == pytest.approx(sps.trim_mean(per_image, 0.1), rel=1e-9)
    assert results["cam_kld"].details["untrimmed_mean"] == pytest.approx(per_image.mean(), rel=1e-9)
    assert results["cam_rmse"].value == pytest.approx(cam_rmse(ref, cand).mean().item(), rel=1e-9)
