"""The gate-power benchmark stays runnable: its thresholds file validates against the shipped gate, each
fault cites a reported bug, its twins differ from their clean base, and the fitted entry it writes reads
back as the numbers it printed. (The benchmark itself runs in ``make bench``: too slow for ``make test``.)"""
import re
from pathlib import Path

import pytest
import torch
import yaml

from qrobust.gate.config import load_thresholds
from qrobust.suites import BUILTIN_THRESHOLDS

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def gate_power(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gate_power
    return gate_power


@pytest.mark.parametrize("family", ["lenet", "lite0"])
def test_each_twin_is_gated_by_its_builtin_entry_in_a_valid_thresholds_file(gate_power, family, tmp_path):

    builtin = yaml.safe_load(BUILTIN_THRESHOLDS.read_text())
    builtin_pair, _, faults, benign = gate_power.FAMILIES[family]
    raw = gate_power.thresholds(family)
    path = tmp_path / "power.yaml"
    path.write_text(yaml.safe_dump(raw))
    parsed = load_thresholds(path)
    names = [f.__name__ for f in faults + benign]
    assert set(parsed.gate) == set(names) and raw["decision"] == builtin["decision"]
    for name in names:
        entry = gate_power.FAKE_QUANT_ENTRY.get(name, builtin_pair)
        assert raw["gate"][name] == builtin["gate"][entry], name
    only = gate_power.thresholds(family, only=names[:1])
    assert list(only["gate"]) == names[:1]


def test_every_fault_cites_a_reported_bug(gate_power):
    for family in gate_power.FAMILIES.values():
        for fault in family[2]:
            assert re.search(r"Reported: [\w.-]+/[\w.-]+#\d+\.", fault.__doc__), fault.__name__


def test_lenet_faults_change_what_the_twin_computes(gate_power):
    """Each misread and the drift move the outputs off the clean twin they are built from; a benign
    recalibration keeps the same graph and recipe."""
    from qrobust import load_dataset

    fp32, pre = gate_power._base()
    x = pre.normalize(load_dataset("digits-test").images[:32])
    with torch.no_grad():
        clean = gate_power.fake_w8a8()[1](x)
        for fault in (gate_power.zero_point_off_by_3, gate_power.scale_doubled, gate_power.six_bit_grid,
                      gate_power.conv_at_4_bits):
            assert (fault()[1](x) - clean).abs().max() > 1e-3, fault.__name__
        int8 = gate_power._int8()[1](x)
        assert (gate_power.preprocessing_drift()[1](x) - int8).abs().max() > 1e-3
        assert torch.equal(gate_power.fbgemm_engine()[1](x), int8)  # bit-identical engines (README)


def test_fitted_entry_reads_back_as_the_numbers_it_printed(gate_power):
    from gate_power_fitted import entry, yaml_number

    for value in (8e-05, 1.4e-05, 0.00029, 0.95, 3.0, 12.5):
        assert yaml.safe_load(yaml_number(value)) == pytest.approx(value, rel=1e-5)
    fitted = {("awgn", 0.2, "kl_mean"): {"tolerance": 8e-05}, ("awgn", 0.2, "agreement"): {"tolerance": 0.97},
              ("blur", 1.0, "cam_kld"): {"tolerance": 0.0012}}
    block = yaml.safe_load("pairs:\n  p:\n" + entry(fitted))["pairs"]["p"]["perturbations"]
    assert block == {"awgn": {"at": {0.2: {"kl_mean": 8e-05, "agreement": 0.97}}},
                     "blur": {"at": {1.0: {"cam_kld": 0.0012}}}}


def test_a_kept_reports_table_is_titled_with_its_decision_and_sample_size(gate_power):
    command = ["qrobust", "run", "power.yaml", "-q", "--qrobust-decision", "familywise", "--qrobust-max-samples=200"]
    assert gate_power.shown_options(command) == ["--qrobust-decision", "familywise", "--qrobust-max-samples=200"]
    assert gate_power.shown_options(["qrobust", "run", "-q"]) == []


def test_a_benchmark_gate_run_that_writes_no_report_says_so_in_one_line(gate_power, tmp_path):
    from gate_run import gate_report

    with pytest.raises(SystemExit, match=r"^seed 0: qrobust run wrote no report \(exit [1-9]"):
        gate_report(["--qrobust-no-such-option"], tmp_path, label="seed 0: qrobust run")


def test_a_benchmark_gate_run_passes_its_thresholds_file_and_options_and_returns_the_report(gate_power, tmp_path):
    from gate_run import gate_report

    (tmp_path / "t.yaml").write_text("max_samples: 60\nreplicates: 100\ndefaults: {kl_mean: 0.02}\n"
                                     "perturbations:\n  awgn: {levels: [0]}\ngate:\n  lenet5-digits-int8-x86: {}\n")
    report, run = gate_report(["t.yaml", "--qrobust-seed=3"], tmp_path)
    assert run.returncode == 0 and report["environment"]["seed"] == 3
    assert {c["pair"] for c in report["cases"]} == {"lenet5-digits-int8-x86"}
