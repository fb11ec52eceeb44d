"""CAMs: equal to pytorch-grad-cam on FP32 models, working on fake-quant and real int8 twins, hooks released."""
import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import EigenCAM as TheirEigenCAM
from pytorch_grad_cam import GradCAM as TheirGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as TheirGradCAMPlusPlus
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

from qrobust.models import zoo
from qrobust.explain.cam import CAM_METHODS, canonical_sign, compute_cams, eigen_projection, postprocess, resolve_layer
from qrobust.data import load_dataset
from qrobust.errors import InvalidArgument, UnsupportedError
from qrobust.models import load_pair

THEIRS = {"gradcam": TheirGradCAM, "gradcampp": TheirGradCAMPlusPlus}


@pytest.fixture(scope="module")
def digits():
    return zoo.DIGITS_PREPROCESS.normalize(load_dataset("digits-test").images[:24])


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def models_and_inputs(digits):
    x = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return [(zoo.lenet5_digits(), "features.4", digits), (resnet18(), "layer4", x)]


@pytest.mark.parametrize("name", ["gradcam", "gradcampp"])
@pytest.mark.parametrize("which", [0, 1], ids=["lenet5", "resnet18"])
def test_gradient_cams_equal_pytorch_grad_cam(digits, name, which):
    model, layer, x = models_and_inputs(digits)[which]
    ours = compute_cams(model, x, layer, [name])
    targets = ours.targets
    theirs = THEIRS[name](model=model, target_layers=[resolve_layer(model, layer)])(
        input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    maps, degenerate = ours.maps[name]
    assert not degenerate.any()
    assert np.abs(maps.numpy() - theirs).max() < 1e-4


@pytest.mark.parametrize("which", [0, 1], ids=["lenet5", "resnet18"])
def test_eigencam_equals_pytorch_grad_cam_up_to_the_principal_sign(digits, which):
    model, layer, x = models_and_inputs(digits)[which]
    ours = compute_cams(model, x, layer, ["eigencam"])
    acts = ours.activations
    their_projection = torch.from_numpy(get_2d_projection(acts.numpy()))
    our_projection = eigen_projection(acts)
    for mine, theirs_p in zip(our_projection, their_projection):
        assert min((mine - theirs_p).abs().max(), (mine + theirs_p).abs().max()) < 1e-4 * theirs_p.abs().max()
    theirs = TheirEigenCAM(model=model, target_layers=[resolve_layer(model, layer)])(input_tensor=x, targets=None)
    # pytorch-grad-cam keeps the SVD's arbitrary sign; with the same sign as ours its map equals ours
    canonical = canonical_sign(their_projection, acts)
    same_sign = [bool(torch.equal(c.sign(), p.sign())) for c, p in zip(canonical, their_projection)]
    expected = scale_cam_image(scale_cam_image(np.maximum(canonical.numpy(), 0), tuple(x.shape[-2:][::-1])))
    maps = ours.maps["eigencam"][0].numpy()
    assert np.abs(maps - expected).max() < 1e-4
    assert all(np.abs(m - t).max() < 1e-4 for m, t, s in zip(maps, theirs, same_sign) if s)


def test_eigencam_sign_canonicalization_on_a_constructed_case():
    h = w = 8
    blob = torch.zeros(h, w)
    blob[2:5, 2:5] = 1.0
    acts = torch.stack([blob * 3, blob * 2 + 0.1, blob]).unsqueeze(0)  # (1, 3, 8, 8): the object is bright
    projection = eigen_projection(acts)
    for p in (projection, -projection):
        canonical = canonical_sign(p, acts)
        assert canonical[0, 3, 3] > canonical[0, 0, 0]  # the object is on the positive side either way
    maps, _ = postprocess(canonical_sign(-projection, acts), (h, w))
    assert maps[0, 3, 3] == 1.0 and maps[0, 0, 0] == 0.0


def test_cams_on_the_lenet_pair_in_all_three_kinds(digits):
    int8, fake = load_pair("lenet5-digits-int8-x86"), load_pair("lenet5-digits-w8a8")
    fp = compute_cams(int8.fp32, digits, int8.target_layer, CAM_METHODS.names())
    q = compute_cams(int8.quantized, digits, int8.quantized_target_layer, ["eigencam"], targets=fp.targets)
    f = compute_cams(fake.quantized, digits, fake.quantized_target_layer, CAM_METHODS.names(), targets=fp.targets)
    assert torch.equal(q.targets, fp.targets) and torch.equal(f.targets, fp.targets)
    for out in (fp, q, f):
        for maps, degenerate in out.maps.values():
            assert maps.shape == (24, 32, 32) and maps.min() >= 0 and maps.max() <= 1 and not degenerate.any()
    # the int8 EigenCAM explains the same place as FP32's
    a, b = fp.maps["eigencam"][0].flatten(1), q.maps["eigencam"][0].flatten(1)
    assert torch.nn.functional.cosine_similarity(a, b).mean() > 0.9


def test_gradient_method_on_real_int8_names_the_fake_quant_twin(digits):
    pair = load_pair("lenet5-digits-int8-x86")
    with pytest.raises(UnsupportedError, match="fake-quant twin"):
        compute_cams(pair.quantized, digits, pair.quantized_target_layer, ["gradcampp"])


def test_degenerate_maps_are_flagged_and_zero_not_nan():
    raw = torch.stack([-torch.ones(4, 4), torch.arange(16.0).reshape(4, 4), torch.zeros(4, 4)])
    maps, degenerate = postprocess(raw, (8, 8))
    assert degenerate.tolist() == [True, False, True]
    assert torch.isfinite(maps).all() and maps[0].abs().sum() == 0 and maps[1].max() == 1


def test_hooks_are_released_also_on_error(digits):
    model = zoo.lenet5_digits()
    layer = resolve_layer(model, "features.4")
    with pytest.raises(InvalidArgument, match="class out of range"):
        compute_cams(model, digits, "features.4", ["gradcam"], targets=torch.full((24,), 10))
    assert not layer._forward_hooks
    compute_cams(model, digits, "features.4", ["eigencam"])
    assert not layer._forward_hooks


def test_bad_input():
    model = zoo.lenet5_digits()
    x = torch.zeros(2, 1, 32, 32)
    with pytest.raises(InvalidArgument, match=r"target_layer='features.9': no such module \(available: features, "
                                              r"features.0"):
        compute_cams(model, x, "features.9", ["gradcam"])
    with pytest.raises(InvalidArgument, match=r"target_layer='classifier.1': output has shape \(2, 120\)"):
        compute_cams(model, x, "classifier.1", ["eigencam"])
    with pytest.raises(InvalidArgument, match="targets="):
        compute_cams(model, x, "features.4", ["gradcam"], targets=[-1, 0])
    with pytest.raises(InvalidArgument, match="method='scorecam'"):
        compute_cams(model, x, "features.4", ["scorecam"])


def test_targets_computed_under_inference_mode_are_accepted(digits):
    model = zoo.lenet5_digits()
    with torch.inference_mode():
        targets = model(digits).argmax(1)
    maps, _ = compute_cams(model, digits, "features.4", ["gradcampp"], targets=targets).maps["gradcampp"]
    assert maps.shape == (24, 32, 32)


class QuadrantModel(torch.nn.Module):
    """Class 0's logit is the mean of the top-left 8 x 8 pixels; class 1's is a constant."""

    def forward(self, x):
        return torch.stack([x[:, :, :8, :8].mean(dim=(1, 2, 3)) * 4, torch.zeros(len(x))], dim=1)


def test_occlusion_matches_a_one_cell_at_a_time_loop_and_finds_what_the_model_reads():
    occlusion = CAM_METHODS.get("occlusion")()
    occlusion.grid = 4
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[:, :, :8, :8] += 2.0  # brighter than the batch mean that fills an occluded cell
    targets = torch.zeros(3, dtype=torch.long)
    model = QuadrantModel()
    fill = x.mean(dim=(0, 2, 3))
    expected = torch.zeros(3, 4, 4)
    base = torch.log_softmax(model(x), 1)[:, 0]
    for r in range(4):
        for c in range(4):
            masked = x.clone()
            masked[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = fill[:, None, None]
            expected[:, r, c] = base - torch.log_softmax(model(masked), 1)[:, 0]
    drops = occlusion.probe(model, x, targets, model(x))
    torch.testing.assert_close(drops, expected)
    assert (drops[:, :2, :2] > 0).all() and (drops[:, 2:, :].abs() < 1e-7).all() and (drops[:, :, 2:].abs() < 1e-7).all()
    cams = compute_cams(model, x, None, ["occlusion"])  # no layer needed
    assert cams.activations is None and cams.maps["occlusion"][0].shape == (3, 16, 16)
    assert cams.maps["occlusion"][0][:, :8, :8].mean() > cams.maps["occlusion"][0][:, 8:, 8:].mean()


def test_occlusion_explains_a_real_int8_twin_like_its_fp32_model(digits):
    pair = load_pair("lenet5-digits-int8-x86")
    fp = compute_cams(pair.fp32, digits[:8], None, ["occlusion"])
    q = compute_cams(pair.quantized, digits[:8], None, ["occlusion"], targets=fp.targets)
    from qrobust.metrics.saliency import cam_cc

    cc = cam_cc(fp.maps["occlusion"][0], q.maps["occlusion"][0])
    assert cc.mean() > 0.9
