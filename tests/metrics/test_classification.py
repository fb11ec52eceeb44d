"""Classification and confidence metrics against sklearn and scipy."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import entropy
from sklearn.metrics import accuracy_score, f1_score, top_k_accuracy_score

from qrobust.errors import InvalidArgument
from qrobust.metrics.classification import F1_AVERAGES, LogHistogram, PairMetrics, f1_from_counts, kl_per_sample, topk_correct


def logits(n, k, seed, scale=3.0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale


@given(st.integers(1, 40), st.integers(2, 12), st.integers(0, 10_000), st.floats(0.01, 30))
def test_kl_matches_scipy_entropy(n, k, seed, scale):
    a, b = logits(n, k, seed, scale), logits(n, k, seed + 1, scale)
    ours = kl_per_sample(a, b).numpy()
    p, q = torch.softmax(a.double(), 1).numpy(), torch.softmax(b.double(), 1).numpy()
    assert np.allclose(ours, entropy(p, q, axis=1), rtol=1e-6, atol=1e-9)


def test_kl_of_identical_logits_is_zero_and_extreme_logits_stay_finite():
    a = logits(5, 10, 0)
    assert torch.all(kl_per_sample(a, a) == 0)
    extreme = torch.tensor([[1000.0, -1000.0, 0.0]])
    assert torch.isfinite(kl_per_sample(extreme, -extreme)).all()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_matches_sklearn(k):
    x, y = logits(200, 8, 3), torch.randint(0, 8, (200,), generator=torch.Generator().manual_seed(4))
    ours = topk_correct(x, y, k).float().mean().item()
    assert ours == pytest.approx(top_k_accuracy_score(y.numpy(), x.numpy(), k=k, labels=range(8)))


def counts_for(pred, labels, k):
    right = pred == labels
    tp = torch.bincount(labels[right], minlength=k).double()
    fp = torch.bincount(pred[~right], minlength=k).double()
    fn = torch.bincount(labels[~right], minlength=k).double()
    return tp, fp, fn


@pytest.mark.parametrize("average", F1_AVERAGES)
@pytest.mark.parametrize("case", ["random", "one_class", "all_wrong", "all_right", "missing_classes"])
def test_f1_matches_sklearn(average, case):
    gen = torch.Generator().manual_seed(5)
    k = 6
    labels = torch.randint(0, k, (120,), generator=gen)
    pred = torch.randint(0, k, (120,), generator=gen)
    if case == "one_class":
        labels = torch.zeros(120, dtype=torch.long)
        pred = torch.where(torch.rand(120, generator=gen) < 0.8, 0, 1)
    elif case == "all_wrong":
        pred = (labels + 1) % k
    elif case == "all_right":
        pred = labels.clone()
    elif case == "missing_classes":
        labels, pred = labels % 3, pred % 2
    expected = f1_score(labels.numpy(), pred.numpy(), average=average, zero_division=0)
    assert float(f1_from_counts(*counts_for(pred, labels, k), average=average)) == pytest.approx(expected, abs=1e-12)


def feed(state, fp, q, y, batch):
    ids = torch.arange(len(y))
    for s in range(0, len(y), batch):
        sl = slice(s, s + batch)
        state.update(fp[sl], q[sl], y[sl], ids[sl], ids[sl])
    return state


def test_pair_metrics_match_sklearn_and_scipy_and_do_not_depend_on_batching():
    n, k = 300, 7
    y = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(6))
    fp = logits(n, k, 7) + 4 * torch.nn.functional.one_hot(y, k)
    q = fp + logits(n, k, 8, scale=1.5)
    res = feed(PairMetrics(k, replicates=200), fp, q, y, 64).results()
    other = feed(PairMetrics(k, replicates=200), fp, q, y, 17).results()
    fp_pred, q_pred = fp.argmax(1).numpy(), q.argmax(1).numpy()
    acc_fp, acc_q = accuracy_score(y.numpy(), fp_pred), accuracy_score(y.numpy(), q_pred)
    assert res["top1_delta"].value == pytest.approx(acc_fp - acc_q)
    assert res["top1_fp32"].value == pytest.approx(acc_fp)
    top5 = top_k_accuracy_score(y.numpy(), fp.numpy(), k=5) - top_k_accuracy_score(y.numpy(), q.numpy(), k=5)
    assert res["top5_delta"].value == pytest.approx(top5)
    f1 = f1_score(y.numpy(), fp_pred, average="macro") - f1_score(y.numpy(), q_pred, average="macro")
    assert res["f1_delta"].value == pytest.approx(f1)
    assert res["agreement"].value == pytest.approx(np.mean(fp_pred == q_pred))
    kl = entropy(torch.softmax(fp.double(), 1).numpy(), torch.softmax(q.double(), 1).numpy(), axis=1)
    assert res["kl_mean"].value == pytest.approx(kl.mean(), rel=1e-9)
    assert res["kl_max"].value == pytest.approx(kl.max(), rel=1e-9)
    assert res["kl_p95"].value == pytest.approx(np.quantile(kl, 0.95, method="inverted_cdf"), rel=0.02)
    lo, hi = res["kl_mean"].interval
    assert lo < kl.mean() < hi
    for name, est in res.items():
        assert est.value == pytest.approx(other[name].value, rel=1e-9, abs=1e-12), name
        assert est.interval == pytest.approx(other[name].interval) if est.interval else other[name].interval is None


def test_nonfinite_outputs_are_counted_with_ids_and_left_out_of_the_metrics():
    fp, q = logits(10, 3, 0), logits(10, 3, 1)
    q[4, 1] = float("nan")
    q[7, 0] = float("inf")
    state = PairMetrics(3, replicates=50)
    state.update(fp, q, torch.zeros(10, dtype=torch.long), torch.arange(100, 110), torch.arange(10))
    assert state.nonfinite == {"fp32": 0, "quantized": 2} and state.nonfinite_ids == [104, 107]
    assert state.n == 8
    assert all(np.isfinite(e.value) for e in state.results().values())


def test_no_samples_is_an_error_not_a_silent_pass():
    with pytest.raises(InvalidArgument, match="nothing to measure"):
        PairMetrics(3).results()


def test_log_histogram_quantiles():
    values = torch.tensor(np.random.default_rng(0).lognormal(-5, 2, size=10_000))
    h = LogHistogram()
    h.add(values)
    for q in (0.5, 0.95, 0.99):
        assert h.quantile(q) == pytest.approx(np.quantile(values.numpy(), q, method="inverted_cdf"), rel=0.012)
    h.add(torch.zeros(5))
    assert h.value_at_rank(1) == 0.0


def test_bad_average_is_refused():
    with pytest.raises(InvalidArgument, match="average='samples'"):
        PairMetrics(3, f1_average="samples")


def test_logit_sqnr_and_cosine_match_numpy_and_are_batch_invariant():
    from qrobust.metrics.classification import SQNR_CAP_DB, logit_sqnr_db

    fp, q = logits(50, 6, 3), logits(50, 6, 3) + 0.1 * logits(50, 6, 4)
    expected = 20 * np.log10(np.linalg.norm(fp.numpy(), axis=1) / np.linalg.norm((fp - q).numpy(), axis=1))
    assert np.allclose(logit_sqnr_db(fp, q).numpy(), expected)
    assert float(logit_sqnr_db(fp, fp).max()) == SQNR_CAP_DB  # identical logits: capped, never inf
    y = torch.zeros(50, dtype=torch.long)
    one = feed(PairMetrics(6, replicates=100), fp, q, y, 50).results()
    many = feed(PairMetrics(6, replicates=100), fp, q, y, 7).results()
    cosine = (fp * q).sum(1) / (fp.norm(dim=1) * q.norm(dim=1))
    assert one["logit_cosine"].value == pytest.approx(float(cosine.double().mean()), rel=1e-6)
    assert one["logit_sqnr_db"].value == pytest.approx(float(expected.mean()), rel=1e-6)
    assert many["logit_sqnr_db"].value == pytest.approx(one["logit_sqnr_db"].value, rel=1e-9)
    assert many["logit_sqnr_db"].interval == pytest.approx(one["logit_sqnr_db"].interval)
