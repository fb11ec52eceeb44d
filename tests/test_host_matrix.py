"""The host matrix's diff: a verdict that moves or a record that disappears fails it, values are counted
with the largest difference named, and timings (measured, never gated) are not differences. (The
matrix itself runs in ``make bench`` and, its cheapest variant, in CI.)"""
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def host_matrix(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import host_matrix
    return host_matrix


def record(metric, value, verdict="pass", pair="p", level=0.1):
    return {"pair": pair, "perturbation": "awgn", "level": level, "metric": metric, "test": f"t[{metric}]",
            "value": value, "verdict": verdict}


def report(*cases):
    return {"cases": list(cases)}


def test_identical_reports_differ_in_nothing(host_matrix):
    cases = [record("kl_mean", 0.01), record("speedup", 1.2, "measured")]
    found = host_matrix.compare(report(*cases), report(*cases))
    assert found == {"records": 2, "verdicts": [], "values": 0, "largest": 0.0, "where": None, "unmatched": 0}
    assert host_matrix.describe(found) == "—"


def test_a_moved_verdict_a_moved_value_and_a_timing(host_matrix):
    reference = report(record("agreement", 0.98), record("kl_mean", 0.010), record("speedup", 1.2, "measured"))
    other = report(record("agreement", 0.94, "fail"), record("kl_mean", 0.011), record("speedup", 0.9, "measured"))
    found = host_matrix.compare(reference, other)
    assert [key[3] for key in found["verdicts"]] == ["agreement"]
    assert found["values"] == 2  # agreement and kl_mean; the timing is no difference
    assert found["largest"] == pytest.approx(0.04)
    assert host_matrix.describe(found) == "0.04 (agreement, p awgn 0.1)"


def test_a_record_only_one_report_has_is_unmatched(host_matrix):
    """A pair that errors on one host loses its records there: that is a different outcome, not a match."""
    reference = report(record("kl_mean", 0.01), record("kl_mean", 0.02, pair="q"))
    found = host_matrix.compare(reference, report(record("kl_mean", 0.01)))
    assert found["unmatched"] == 1 and found["records"] == 1


def test_an_unknown_variant_is_a_usage_error_naming_the_known_ones(host_matrix, capsys):
    with pytest.raises(SystemExit) as exit_info:
        host_matrix.main(["--variants", "AVX-1024", "--reference", "unused.json"])
    assert exit_info.value.code == 2
    assert "unknown variant 'AVX-1024' (known: ATEN_CPU_CAPABILITY=default" in capsys.readouterr().err


def test_make_suites_node_ids_match_qrobust_runs(host_matrix):
    """make suite collects suites/test_gate.py in the clone, qrobust run the installed test_gate.py: CI
    diffs one against the other (it compared 0 records and failed before)."""
    in_clone = record("kl_mean", 0.01) | {"test": "suites/test_gate.py::test_metric[kl_mean-p-awgn-0.1]"}
    installed = record("kl_mean", 0.02) | {"test": "test_gate.py::test_metric[kl_mean-p-awgn-0.1]"}
    found = host_matrix.compare(report(in_clone), report(installed))
    assert (found["records"], found["unmatched"], found["values"]) == (1, 0, 1)
