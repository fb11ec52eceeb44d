"""Placement: a batch meets a model only through ``qrobust.placement.feed``, on the model's device.

No GPU here, so two stand-ins: the ``meta`` device (shape-only tensors on a second device, enough for
a forward) and ``checked_forward``, which makes a model refuse any call that bypasses ``feed``: a stage
calling a model directly works on a one-device machine and breaks on a GPU runner (2,457 of 2,458
checks failed there before ``feed``).
"""
import textwrap

import pytest
import torch
from torch import nn

from helpers import make_pair, small_net, synthetic_set
from qrobust.gate.engine import Evaluator
from qrobust.placement import PlacementError, checked_forward, device_of, feed, stage
from qrobust.quant import get_preset, quantize_model


def calibration():
    return [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))]


def test_a_fake_quant_twin_takes_its_quantizers_to_its_device():
    """Per-channel scales are 1-d tensors: left on the CPU they stop a twin moved to another device
    (``Expected all tensors to be on the same device ... cuda:0 and cpu``, seen on an H200)."""
    twin = quantize_model(small_net(), get_preset("fake-w8a8"), calibration()).to("meta")
    assert device_of(twin) == torch.device("meta")
    out = feed(twin, torch.rand(2, 3, 16, 16))
    assert out.device.type == "meta" and tuple(out.shape) == (2, 5)


def test_int8_twins_and_runtimes_take_cpu_inputs_whatever_their_buffers():
    twin = quantize_model(small_net(), get_preset("int8-x86"), calibration())
    assert device_of(twin) == torch.device("cpu") and device_of(nn.Identity()) == torch.device("cpu")
    assert device_of(nn.Linear(2, 2).to("meta")) == torch.device("meta")


class HalfMoved(nn.Module):
    """A user module that builds a tensor on the CPU inside forward: moved, it breaks on another device."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x) + torch.ones(4)[None].expand(len(x), 4).clone()


def test_a_placement_error_inside_a_model_names_the_pair_the_stage_and_the_model():
    model = HalfMoved().to("meta")
    with pytest.raises(PlacementError, match=r"^pair p, stage evaluate: the fp32 on meta met a tensor on another "
                                             r"device \(.*device"):
        with stage("evaluate", "p"):
            feed(model, torch.rand(2, 4), role="fp32")


def test_a_model_error_that_is_not_about_devices_passes_through():
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        feed(nn.Linear(3, 2), torch.rand(2, 4))


def test_checked_forward_refuses_a_direct_call():
    model = nn.Linear(4, 2)
    checked_forward(model, "fp32[p]")
    assert feed(model, torch.rand(1, 4)).shape == (1, 2)
    with pytest.raises(AssertionError, match="fp32\\[p\\] was called outside qrobust.placement.feed"):
        model(torch.rand(1, 4))


def test_every_engine_stage_feeds_the_models():
    """Probe, the twin-layer match, evaluation with CAMs (gradient and gradient-free), the FGSM attack
    and the inputs a diagnosis replays: every model call comes through ``feed``."""
    fp32 = small_net(4)
    fake = make_pair("fake", fp32, target_layer="2")
    int8 = make_pair("int8", fp32, preset="int8-x86", target_layer="2")
    for pair in (fake, int8):
        checked_forward(pair.quantized, f"twin of {pair.name}")
    checked_forward(fp32, "shared fp32")
    ev = Evaluator([fake, int8], datasets={"synthetic": synthetic_set(40)}, replicates=50, batch_size=16,
                   cam_cases={(p, "fgsm", 0.05) for p in ("fake", "int8")} | {("int8", "awgn", 0.1)})
    for name in ("fake", "int8"):
        result = ev.evaluate(name, "fgsm", 0.05)
        assert result.healthy and "cam_cc" in result.estimates
        assert "cam_rmse" in ev.evaluate(name, "awgn", 0.1, cam=True).estimates
    x, _ = ev.case_inputs("int8", "fgsm", 0.05, 8)
    assert x.device.type == "cpu" and len(x) == 8


GATE = textwrap.dedent("""\
    decision: point
    max_samples: 60
    replicates: 50
    defaults: {top1_delta: 0.0, agreement: 1.0, kl_mean: 0.0, cam_cc: 1.0}
    perturbations: {awgn: {levels: [0, 0.1]}, fgsm: {levels: [0.05]}}
    gate: {guarded-int8: {}, guarded-fake: {}}
    explanations: {pairs: [guarded-int8], samples: 8, steps: 4, tolerances: {deletion_auc_delta: 0.9}}
    latency: {pairs: [guarded-int8], batch: 4, rounds: 3}
    """)


def test_the_whole_gate_feeds_the_models(pytester):
    """Every stage a gate run takes (calibrate aside: it builds the twin), diagnosis of failing cases
    included: the tolerances above fail every case on purpose."""
    pytester.makeconftest("""
        from helpers import make_pair, small_net, synthetic_set
        from qrobust.data import DATASETS
        from qrobust.models import PAIRS, register_pair
        from qrobust.placement import checked_forward

        fp32 = small_net(4)
        pairs = {name: make_pair(name, fp32, preset=preset, target_layer="2")  # calibrated before the guard
                 for name, preset in (("guarded-int8", "int8-x86"), ("guarded-fake", "fake-w8a8"))}
        checked_forward(fp32, "fp32")
        for name, pair in pairs.items():
            checked_forward(pair.quantized, "twin of " + name)

        if "guarded-int8" not in PAIRS:
            for name, pair in pairs.items():
                register_pair(name, lambda pair=pair: pair)
        if "synthetic" not in DATASETS:
            DATASETS.register("synthetic", lambda: synthetic_set(60))
    """)
    pytester.makefile(".yaml", thresholds=GATE)
    result = pytester.runpytest("-p", "no:cacheprovider", "--pyargs", "qrobust.suites")
    output = result.stdout.str()
    assert "called outside qrobust.placement.feed" not in output, output[-3000:]
    assert "worst layers:" in output  # diagnosis ran (through feed) on the failing cases
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) > 0 and outcomes.get("passed", 0) > 0  # latency / explanations pass
