"""Where an average hides a regression: per-class deltas against sklearn's per-class recall, ECE against a
plain numpy implementation, the operating point against a direct count; states that merge exactly."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import recall_score

from qrobust.gate.verdict import judge
from qrobust.metrics.classification import PairMetrics
from qrobust.metrics.segments import ECE_BINS, MIN_CLASS_SAMPLES, expected_calibration_error


def numpy_ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Guo et al. 2017: bins (k/B, (k+1)/B], sum over bins of |B_k| / n * |acc(B_k) - conf(B_k)|."""
    total = 0.0
    for k in range(bins):
        low, high = k / bins, (k + 1) / bins
        inside = (confidence > low) & (confidence <= high) if k else (confidence <= high)
        if inside.any():
            total += inside.sum() / len(confidence) * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def outputs(n, k, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    fp = torch.randn(n, k, generator=g) * scale
    q = fp + torch.randn(n, k, generator=g) * scale / 3
    labels = torch.randint(0, k, (n,), generator=g)
    return fp, q, labels


@given(st.integers(1, 300), st.integers(2, 12), st.integers(0, 10_000), st.floats(0.01, 20))
def test_ece_matches_a_plain_numpy_implementation(n, k, seed, scale):
    fp, _, labels = outputs(n, k, seed, scale)
    probs = torch.softmax(fp.double(), 1)
    conf, pred = probs.max(1)
    correct = (pred == labels)
    assert expected_calibration_error(conf, correct) == pytest.approx(
        numpy_ece(conf.numpy(), correct.numpy().astype(float), ECE_BINS), abs=1e-12)


def test_ece_delta_operating_point_and_worst_class_against_their_oracles():
    fp, q, labels = outputs(600, 6, 1)
    state = PairMetrics(6, seed=0, replicates=200, operating_point=0.6)
    state.update(fp, q, labels, torch.arange(600), torch.arange(600))
    got = state.results()
    conf = {m: torch.softmax(x.double(), 1).max(1) for m, x in (("fp", fp), ("q", q))}
    ece = {m: numpy_ece(c.values.numpy(), (c.indices == labels).numpy().astype(float)) for m, c in conf.items()}
    assert got["ece_delta"].value == pytest.approx(ece["q"] - ece["fp"], abs=1e-12)
    low, high = got["ece_delta"].interval
    assert low <= got["ece_delta"].value <= high and high - low > 0
    flips = ((conf["fp"].values >= 0.6) != (conf["q"].values >= 0.6)).sum().item()
    assert got["operating_point_flips"].value == flips / 600 and got["operating_point_flips"].details["flips"] == flips
    recall = {m: recall_score(labels.numpy(), x.argmax(1).numpy(), average=None, labels=range(6))
              for m, x in (("fp", fp), ("q", q))}
    deltas = recall["fp"] - recall["q"]
    worst = got["class_top1_delta"]
    assert worst.value == pytest.approx(deltas.max()) and worst.details["class"] == int(deltas.argmax())
    assert worst.details["classes_judged"] == 6 and "unjudged" not in worst.details


def test_the_worst_class_interval_is_widened_over_the_classes_judged():
    """Picking the worst of K classes: its interval is at 1 - 0.05 / K, wider than one class's 95%."""
    from qrobust.metrics.stats import paired_interval

    fp, q, labels = outputs(600, 6, 2)
    state = PairMetrics(6, replicates=50)
    state.update(fp, q, labels, torch.arange(600), torch.arange(600))
    worst = state.results()["class_top1_delta"]
    c = worst.details["class"]
    counts = [int(state.class_counts["fp"]["tp"][c]), int(state.class_counts["q"]["tp"][c]), worst.details["b"],
              worst.details["c"], worst.details["n_class"]]
    assert worst.interval == paired_interval(*counts, confidence=1 - 0.05 / 6)
    single = paired_interval(*counts, confidence=0.95)
    assert worst.interval[0] < single[0] and worst.interval[1] > single[1]


def test_a_class_with_too_few_samples_makes_the_check_inconclusive_never_a_pass():
    fp, q, labels = outputs(200, 4, 3)
    labels[labels == 3] = 0
    labels[:MIN_CLASS_SAMPLES - 1] = 3  # class 3: one sample too few
    q = fp.clone()  # no regression anywhere: the judged classes pass
    state = PairMetrics(4, replicates=50)
    state.update(fp, q, labels, torch.arange(200), torch.arange(200))
    estimate = state.results()["class_top1_delta"]
    assert "fewer than 10 samples" in estimate.details["unjudged"] and estimate.details["classes_judged"] == 3
    for mode in ("point", "familywise"):
        record, _ = judge(test="t", pair="p", perturbation="clean", level=0.0, metric="class_top1_delta",
                          estimate=estimate, tolerance=0.05, mode=mode, family_size=10)
        assert record.verdict == "inconclusive" and "fewer than 10 samples" in record.extra["note"]
    record, message = judge(test="t", pair="p", perturbation="clean", level=0.0, metric="class_top1_delta",
                            estimate=estimate, tolerance=0.05, mode="strict")
    assert record.verdict == "inconclusive" and message  # strict: unproven fails, with its line


def test_split_states_merge_to_the_one_pass_state():
    fp, q, labels = outputs(300, 5, 4)
    ids = torch.arange(300)
    whole = PairMetrics(5, replicates=100, operating_point=0.5)
    whole.update(fp, q, labels, ids, ids)
    first, second = PairMetrics(5, replicates=100, operating_point=0.5), PairMetrics(5, replicates=100, operating_point=0.5)
    first.update(fp[:128], q[:128], labels[:128], ids[:128], ids[:128])
    second.update(fp[128:], q[128:], labels[128:], ids[128:], ids[128:])
    merged = PairMetrics.from_state(first.state())
    merged.merge(PairMetrics.from_state(second.state()))
    for name in ("class_top1_delta", "ece_delta", "operating_point_flips"):
        a, b = whole.results()[name], merged.results()[name]
        assert a.value == pytest.approx(b.value, abs=1e-12) and a.interval == pytest.approx(b.interval, abs=1e-12)
