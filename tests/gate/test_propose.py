"""``qrobust propose``: tolerances fitted to benign runs land where the gate reads them, never looser
than the tolerance in force, and bad input is one line."""
import json
import statistics

import pytest
import yaml

from qrobust.cli import main
from qrobust.gate.config import load_thresholds
from qrobust.gate.plan import gate_cases
from qrobust.gate.propose import fit

PAIR = "lenet5-digits-int8-x86"
THRESHOLDS = f"""\
decision: point
max_samples: 60
replicates: 100
defaults: {{top1_delta: 0.02, agreement: 0.95, kl_mean: 0.02}}
perturbations:
  awgn: {{levels: [0, 0.2, 0.4]}}
  brownian: {{levels: [0, 0.1], at: {{0.1: {{kl_mean: 0.03}}}}}}
gate:
  {PAIR}: {{}}
"""


def record(perturbation, level, metric, value, width=0.002, n=450, pair=PAIR):
    return {"pair": pair, "perturbation": perturbation, "level": level, "metric": metric, "value": value,
            "interval": [value - width / 2, value + width / 2], "n": n}


def test_fit_is_the_worst_value_plus_three_noise_rounded_outwards_and_capped():
    records = [record("awgn", 0.2, "kl_mean", v) for v in (0.0010, 0.0014, 0.0012)]
    noise = max(statistics.stdev([0.0010, 0.0014, 0.0012]), 0.002 / 3.92)
    p = fit(records, ceiling=0.02, headroom=3)
    assert p["tolerance"] >= 0.0014 + 3 * noise and p["tolerance"] - (0.0014 + 3 * noise) < 0.0001
    assert fit(records, ceiling=0.002, headroom=3)["tolerance"] == 0.002  # the tolerance in force is a ceiling
    low = fit([record("awgn", 0.2, "agreement", v, width=0.01) for v in (0.99, 0.98)], ceiling=0.9, headroom=3)
    assert 0.9 < low["tolerance"] <= 0.98 - 3 * statistics.stdev([0.99, 0.98])  # a minimum goes down
    never_flipped = fit([record("awgn", 0.2, "top1_delta", 0.0, width=0.0)], ceiling=0.05, headroom=3)
    assert never_flipped["tolerance"] == pytest.approx(3 / 450, abs=0.0002)  # one sample of noise, not zero


def test_a_check_without_spread_borrows_the_median_noise_of_its_metric():
    """Identical benign runs (CC exactly 1 on every image) leave a check no noise of its own."""
    from qrobust.gate.propose import noise_floors

    fits = {("awgn", level, "cam_cc"): fit([record("awgn", level, "cam_cc", 1 - w, width=w)], None, 3)
            for level, w in ((0.1, 0.0), (0.2, 0.004), (0.3, 0.008), (0.4, 0.012))}
    assert fits[("awgn", 0.1, "cam_cc")]["tolerance"] > 0.99999  # alone: any deviation would fail
    floor = noise_floors(fits)["cam_cc"]
    assert floor == pytest.approx(0.008 / 3.92)
    assert fit([record("awgn", 0.1, "cam_cc", 1.0, width=0.0)], None, 3, floor)["tolerance"] < 1 - 2 * floor


def synthetic_reports(tmp_path, runs=3):
    paths = []
    for r in range(runs):
        cases = []
        for pert, level in (("awgn", 0), ("awgn", 0.2), ("awgn", 0.4), ("brownian", 0), ("brownian", 0.1)):
            cases += [record(pert, level, "kl_mean", 0.001 * (1 + level * 10) + 0.0001 * r),
                      record(pert, level, "agreement", 1 - 0.02 * level - 0.002 * r, width=0.02),
                      record(pert, level, "top1_delta", 0.01 * level, width=0.03),
                      record(pert, level, "kl_mean", 0.5, pair="lenet5-digits-asym2")]
        paths.append(tmp_path / f"r{r}.json")
        paths[-1].write_text(json.dumps({"cases": cases}))
    return [str(p) for p in paths]


def test_proposed_tolerances_are_the_ones_the_gate_resolves(tmp_path, capsys):
    source = tmp_path / "gate.yaml"
    source.write_text(THRESHOLDS)
    out = tmp_path / "fitted.yaml"
    assert main(["propose", str(source), "--from", *synthetic_reports(tmp_path), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# fitted by `qrobust propose`") and "kl_mean: 5 checks" in text
    fitted = {(c.perturbation, c.level): dict(c.tolerances) for c in gate_cases(load_thresholds(out))}
    assert fitted[("brownian", 0.1)]["kl_mean"] < fitted[("awgn", 0.4)]["kl_mean"] < 0.02  # per level, tightened
    assert fitted[("awgn", 0.0)] == fitted[("brownian", 0.0)]  # level 0: one evaluation, one tolerance
    assert 0.95 <= fitted[("awgn", 0.4)]["agreement"] < fitted[("awgn", 0.0)]["agreement"] < 1
    assert all(t["top1_delta"] <= 0.02 for t in fitted.values())
    assert yaml.safe_load(text)["defaults"] == yaml.safe_load(THRESHOLDS)["defaults"]  # the rest is kept


def test_benign_variants_widen_the_fit(tmp_path):
    source = tmp_path / "gate.yaml"
    source.write_text(THRESHOLDS)
    reports = synthetic_reports(tmp_path, runs=1)
    variant = json.loads(open(reports[0]).read())
    for case in variant["cases"]:
        case["pair"] = "recalibrated" if case["pair"] == PAIR else case["pair"]
        case["value"] = case["value"] * 1.5 if case["metric"] == "kl_mean" else case["value"]
    (tmp_path / "variant.json").write_text(json.dumps(variant))
    outs = {}
    for name, extra in (("alone", []), ("with", ["--benign", "recalibrated"])):
        outs[name] = tmp_path / f"{name}.yaml"
        assert main(["propose", str(source), "--from", reports[0], str(tmp_path / "variant.json"), "--pair", PAIR,
                     *extra, "-o", str(outs[name])]) == 0
    tol = {k: {(c.perturbation, c.level): c.tolerances["kl_mean"] for c in gate_cases(load_thresholds(p))}
           for k, p in outs.items()}
    assert all(tol["with"][key] > tol["alone"][key] for key in tol["alone"])


@pytest.mark.parametrize("args,message", [
    (["--from", "missing.json"], "missing.json"),
    (["--from", "bad.json"], "bad.json: not a readable qrobust report.json"),
    (["--from", "empty.json"], "the reports hold no gated value of pair"),
    (["--from", "empty.json", "--pair", "nope"], "--pair: 'nope' is not gated"),
    (["--from", "empty.json", "--headroom", "0"], "--headroom: must be a positive number"),
])
def test_bad_input_is_one_line_and_exit_4(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gate.yaml").write_text(THRESHOLDS)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.json").write_text(json.dumps({"cases": []}))
    assert main(["propose", "gate.yaml", *args]) == 4
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_benign_without_a_pair_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["propose", "--from", "r.json", "--benign", "x"])
    assert exit_info.value.code == 2 and "--benign needs --pair" in capsys.readouterr().err


@pytest.mark.slow
def test_propose_gates_with_each_seed_and_fits_the_real_twin(tmp_path):
    """End to end: two seeded runs of the real LeNet int8 twin, and the fitted file gates it green."""
    source = tmp_path / "gate.yaml"
    source.write_text(THRESHOLDS)
    out = tmp_path / "fitted.yaml"
    assert main(["propose", str(source), "--seeds", "0,1", "-o", str(out), "--", "-p", "no:randomly"]) == 0
    text = out.read_text()
    assert "qrobust run gate.yaml --qrobust-seed 1" in text
    fitted = [dict(c.tolerances) for c in gate_cases(load_thresholds(out))]
    assert all(t["kl_mean"] < 0.02 for t in fitted)  # tighter than the literature's absolute tolerance
    assert main(["run", str(out), "-q", "-p", "no:randomly", f"--qrobust-report={tmp_path / 'r'}"]) == 0
