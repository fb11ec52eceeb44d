"""The evaluation engine: evaluated once, shared FP32 forwards, batch-size invariance, output health."""
import pytest
import torch
from torch import nn

from helpers import make_pair, synthetic_set, tiny_net
from qrobust.data import ImageSet
from qrobust.errors import InvalidArgument, ModelOutputError
from qrobust.gate.engine import Evaluator
from qrobust.models import load_pair

def tiny(k=4):
    return tiny_net(k)


def evaluator(*pairs, **kw):
    return Evaluator(list(pairs), datasets={"synthetic": synthetic_set()}, replicates=100, **kw)


def test_five_metrics_of_one_case_run_each_model_once_per_batch():
    fp32 = tiny()
    ev = evaluator(make_pair("a", fp32), make_pair("b", fp32), batch_size=16)
    for metric in ("top1_delta", "kl_p95", "f1_delta", "agreement", "kl_mean"):
        ev.evaluate("a", "awgn", 0.1).metric(metric)
    ev.evaluate("b", "awgn", 0.1)  # same group: already computed
    batches = 7  # ceil(100 / 16)
    assert ev.perturbed_batches["fp32[a]"] == batches
    assert ev.forward_passes["fp32[a]"] == batches
    assert ev.forward_passes["a"] == batches and ev.forward_passes["b"] == batches
    assert set(ev.forward_report()["forwards_per_perturbed_batch"].values()) == {1.0}


def test_level_zero_is_evaluated_once_for_every_perturbation():
    ev = evaluator(make_pair("a", tiny()), batch_size=50)
    a = ev.evaluate("a", "awgn", 0)
    b = ev.evaluate("a", "jpeg", 0)
    assert ev.forward_passes["a"] == 2
    assert a.estimates == b.estimates and b.perturbation == "jpeg"


@pytest.mark.parametrize("pert,level", [("awgn", 0.2), ("brownian", 0.2), ("occlusion_vertical", 3), ("fgsm", 0.05)])
def test_results_are_identical_for_batch_sizes_16_and_64(pert, level):
    fp32 = tiny()
    pair = make_pair("a", fp32)
    r16 = evaluator(pair, batch_size=16).evaluate("a", pert, level)
    r64 = evaluator(pair, batch_size=64).evaluate("a", pert, level)
    assert r16.state.counts == r64.state.counts
    for name, est in r16.estimates.items():
        assert est.value == pytest.approx(r64.estimates[name].value, rel=1e-6, abs=1e-9), name


class NaNOnWhite(nn.Module):
    """Returns NaN for an all-white image (normalized mean 2.0), like a kernel overflowing on one input."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        white = (x.mean(dim=(1, 2, 3)) > 1.99)[:, None]
        return torch.where(white, torch.full_like(out, float("nan")), out)


def test_nan_in_a_quantized_output_fails_the_case_naming_it():
    data = synthetic_set()
    images = data.images.clone()
    images[60] = 1.0  # sample id 1060; every other sample stays below 0.95 after brightness 0.1
    data = ImageSet("synthetic", images, data.labels, data.ids, data.groups, 4)
    pair = make_pair("a", tiny(), quantized=NaNOnWhite(tiny()))
    ev = Evaluator([pair], datasets={"synthetic": data}, replicates=50, batch_size=16)
    result = ev.evaluate("a", "brightness", 0.1)
    assert not result.healthy and result.n == 99
    msg = result.health_message()
    assert "a / brightness @ 0.1" in msg and "quantized: 1 of 100" in msg and "[1060]" in msg


def test_class_count_mismatch_is_caught_by_the_probe():
    fp32 = tiny(4)
    bad = make_pair("a", fp32, quantized=tiny(5))
    with pytest.raises(ModelOutputError, match=r"pair 'a': quantized model returned shape \(\d+, 5\), expected"):
        evaluator(bad).evaluate("a", "awgn", 0.1)


def test_nan_on_clean_input_is_caught_by_the_probe():
    broken = nn.Sequential(tiny(), nn.Threshold(1e9, float("nan")))
    with pytest.raises(ModelOutputError, match="NaN/Inf on clean input"):
        evaluator(make_pair("a", tiny(), quantized=broken)).evaluate("a", "awgn", 0.1)


def test_progress_is_reported_after_every_batch():
    seen = []
    ev = evaluator(make_pair("a", tiny()), batch_size=32)
    ev.progress = lambda label, done, total: seen.append((label, done, total))
    ev.evaluate("a", "awgn", 0.1)
    assert seen == [("a awgn @ 0.1", i, 4) for i in range(1, 5)]


class FakeTerminal:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, text):
        self.text += text

    def flush(self):
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_terminal_progress_draws_only_on_a_terminal_and_restores_the_line(monkeypatch, tty):
    import types

    from qrobust.plugin import TerminalProgress

    terminal = FakeTerminal(tty)
    monkeypatch.setattr("sys.stdout", terminal)
    config = types.SimpleNamespace(pluginmanager=types.SimpleNamespace(getplugin=lambda name: None))
    progress = TerminalProgress(config)
    for done in (1, 2, 3):
        progress("lenet awgn @ 0.1", done, 3)
    progress("single batch", 1, 1)
    if tty:
        assert terminal.text.startswith("\x1b7\x1b8\x1b[K [qrobust lenet awgn @ 0.1: batch 1/3]")
        assert terminal.text.endswith("\x1b8\x1b[K") and "single" not in terminal.text
    else:
        assert terminal.text == ""


def test_bad_requests_are_clear_errors():
    ev = evaluator(make_pair("a", tiny()))
    with pytest.raises(InvalidArgument, match="did you mean 'awgn'"):
        ev.evaluate("a", "awgm", 0.1)
    with pytest.raises(InvalidArgument, match="^level="):
        ev.evaluate("a", "awgn", -1)
    with pytest.raises(InvalidArgument, match="pair='zzz'"):
        ev.evaluate("zzz", "awgn", 0.1)
    with pytest.raises(InvalidArgument, match="dataset"):
        ImageSet("empty", torch.zeros(0, 3, 4, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                 torch.zeros(0, dtype=torch.long), 4)
    with pytest.raises(InvalidArgument, match="pair='a'.*loaded: none"):
        Evaluator().evaluate("a", "awgn", 0.1)


def test_labels_beyond_the_class_count_are_refused():
    pair = make_pair("a", tiny(3), k=3)
    with pytest.raises(InvalidArgument, match="has labels 0..3 but pair 'a' has 3 classes"):
        evaluator(pair).evaluate("a", "awgn", 0.1)


def test_lenet_int8_pair_over_every_perturbation():
    pair = load_pair("lenet5-digits-int8-x86")
    ev = Evaluator([pair], replicates=200, max_samples=200)
    from qrobust.data.perturbations import PERTURBATIONS
    for name in PERTURBATIONS:
        level = PERTURBATIONS.get(name).levels[2]
        result = ev.evaluate(pair.name, name, level)
        assert result.healthy and result.n == 200
        assert result.metric("agreement").value >= 0.9
        assert abs(result.metric("top1_delta").value) <= 0.05


def test_fgsm_computes_the_fp32_gradient_once_per_batch_for_every_level():
    ev = evaluator(make_pair("a", tiny()), batch_size=50)
    first = ev.evaluate("a", "fgsm", 0.02)
    assert ev.forward_passes["fp32[a] gradient"] == 2  # 100 samples, batches of 50
    second = ev.evaluate("a", "fgsm", 0.05)
    assert ev.forward_passes["fp32[a] gradient"] == 2  # reused: the sign does not depend on epsilon
    fresh = evaluator(make_pair("a", tiny()), batch_size=50).evaluate("a", "fgsm", 0.05)
    assert second.state.counts == fresh.state.counts and first.n == second.n == 100
