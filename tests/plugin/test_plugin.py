"""The pytest plugin, run for real with pytester: options, verdicts, exit codes, report, baselines, xdist."""
import json

import pytest

from helpers import BITWIDTH_SUITE, SUITE, thresholds
from qrobust.gate.report import REPORT_SCHEMA

@pytest.fixture(scope="module", autouse=True)
def warm_pairs():
    """Build the LeNet pairs once in this process: in-process pytest runs then reuse them."""
    from qrobust.gate.engine import Evaluator
    from qrobust.models import load_pair

    pair = load_pair("lenet5-digits-int8-x86")
    Evaluator([pair], max_samples=8, replicates=10).evaluate(pair.name, "awgn", 0.1)


@pytest.fixture
def gate(pytester):
    pytester.makepyfile(test_gate=SUITE)
    return pytester


def test_help_lists_every_option(pytester):
    out = pytester.runpytest("--help").stdout.str()
    for opt in ("--qrobust-thresholds", "--qrobust-pairs", "--qrobust-device", "--qrobust-seed", "--qrobust-report",
                "--qrobust-decision", "--qrobust-max-samples", "--qrobust-save-baseline", "--qrobust-baseline",
                "--qrobust-overwrite-baseline", "--qrobust-baseline-any-env", "QROBUST_THRESHOLDS"):
        assert opt in out


def test_clean_gate_passes_and_writes_a_schema_valid_report(gate):
    jsonschema = pytest.importorskip("jsonschema")
    gate.makefile(".yaml", thresholds=thresholds())
    result = gate.runpytest("-p", "no:cacheprovider", "--junitxml=junit.xml")
    result.assert_outcomes(passed=12)
    result.stdout.fnmatch_lines(["*12 checks: 12 pass, 0 fail*", "*report: *report.json*"])
    report = json.loads((gate.path / "qrobust-report" / "report.json").read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    assert {c["verdict"] for c in report["cases"]} == {"pass"} and len(report["cases"]) == 12
    assert report["environment"]["weights"]["lenet5-digits-int8-x86"] and report["environment"]["thresholds_sha256"]
    assert set(report["forward_passes"]["forwards_per_perturbed_batch"].values()) == {1.0}
    assert "<svg" in (gate.path / "qrobust-report" / "report.html").read_text()
    junit = (gate.path / "junit.xml").read_text()
    assert 'name="qrobust_metric" value="top1_delta"' in junit and "qrobust_case" not in junit
    ids = [line for line in gate.runpytest("--collect-only", "-q").stdout.lines if "::" in line]
    assert "test_gate.py::test_top1_delta[lenet5-digits-int8-x86-awgn-0.1]" in ids


FAMILYWISE = """\
decision: {decision}
max_samples: 200
replicates: 200
defaults: {{agreement: 0.996}}
perturbations:
  awgn: {{levels: [0, 0.5, 0.7]}}
gate:
  {pair}: {{}}
"""


def test_familywise_passes_a_marginal_violation_and_still_fails_a_broken_twin(gate):
    """Agreement a flip under its 0.996 minimum (199 of 200 agree) fails the point decision, not the familywise one (3
    checks in the family, each at 1 - 2 * 0.05 / 3); a broken twin (asymmetric 2 bits) fails either way."""
    gate.makefile(".yaml", thresholds=FAMILYWISE.format(decision="point", pair="lenet5-digits-int8-x86"))
    assert gate.runpytest("-p", "no:cacheprovider").ret == 1
    gate.makefile(".yaml", thresholds=FAMILYWISE.format(decision="familywise", pair="lenet5-digits-int8-x86"))
    result = gate.runpytest("-p", "no:cacheprovider")
    report = json.loads((gate.path / "qrobust-report" / "report.json").read_text())
    cases = [c for c in report["cases"] if c["metric"] == "agreement"]
    assert result.ret == 0 and any(c["verdict"] == "inconclusive" for c in cases)
    assert {c["family"]["size"] for c in cases} == {3} and report["environment"]["decision"] == "familywise"
    gate.makefile(".yaml", thresholds=FAMILYWISE.format(decision="familywise", pair="lenet5-digits-asym2"))
    result = gate.runpytest("-p", "no:cacheprovider")
    assert result.ret == 1 and "familywise 96.67% CI" in result.stdout.str()


def test_failing_gate_exits_1_with_the_full_message(gate):
    gate.makefile(".yaml", thresholds=thresholds(pair="lenet5-digits-asym2"))
    result = gate.runpytest()
    assert result.ret == 1
    out = result.stdout.str()
    assert ("top1_delta " in out and " > 0.01 at lenet5-digits-asym2 / awgn @ 0.1 (95% CI [" in out and "n=120" in out
            and "margin -" in out and "decision point: fail" in out)
    assert "b=" in out and "c=" in out and "mcnemar_p=" in out and "n_required=" in out


def test_strict_expected_failure_is_caught_and_turns_red_when_it_passes(gate):
    extra = "bitwidth: {pairs: [lenet5-digits-asym2, lenet5-digits-asym8], min_bits: 4, tolerances: {kl_mean: 0.02}}\n"
    gate.makefile(".yaml", thresholds=thresholds(extra=extra))
    gate.makepyfile(test_bits=BITWIDTH_SUITE)
    gate.runpytest("-k", "bitwidth").assert_outcomes(passed=1, xfailed=1)  # -k: the gate file's tests are collected
    # min_bits 8 would call the 2-bit case below the bar too; min_bits 1 makes it a plain (failing) case
    gate.makefile(".yaml", thresholds=thresholds(extra=extra.replace("min_bits: 4", "min_bits: 1")))
    gate.runpytest("-k", "bitwidth").assert_outcomes(passed=1, failed=1)


def test_a_multi_metric_check_records_each_verdict(gate):
    extra = "bitwidth: {pairs: [lenet5-digits-asym3], min_bits: 1, tolerances: {top1_delta: 0.05, kl_mean: 0.01}}\n"
    gate.makefile(".yaml", thresholds=thresholds(extra=extra))
    gate.makepyfile(test_bits=BITWIDTH_SUITE)
    result = gate.runpytest("-k", "bitwidth")
    result.assert_outcomes(failed=1)
    verdicts = {c["metric"]: c["verdict"] for c in json.loads(
        (gate.path / "qrobust-report" / "report.json").read_text())["cases"]}
    assert verdicts == {"top1_delta": "pass", "kl_mean": "fail"}  # 3 bits: accuracy holds, confidence does not


def test_a_pair_can_take_a_subset_of_the_sweep_levels(gate):
    extra_pair = "  lenet5-digits-w8a8: {perturbations: {awgn: {levels: [0.1]}}}\n"
    gate.makefile(".yaml", thresholds=thresholds() + extra_pair)
    ids = [line for line in gate.runpytest("--collect-only", "-q").stdout.lines if "w8a8" in line]
    assert len(ids) == 3 and all(line.endswith("[lenet5-digits-w8a8-awgn-0.1]") for line in ids)


def test_metrics_restriction_generates_only_those_checks(gate):
    extra_pair = "  lenet5-digits-w8a8: {metrics: [kl_mean]}\n"
    gate.makefile(".yaml", thresholds=thresholds() + extra_pair)
    gate.makepyfile(test_marked="""
        import pytest

        @pytest.mark.qrobust_metrics("top1_delta")
        def test_top1_delta(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "top1_delta")

        @pytest.mark.qrobust_metrics("kl_mean")
        def test_kl_mean(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "kl_mean")
    """)
    result = gate.runpytest("test_marked.py", "test_gate.py")
    # 4 cases per pair; the marked top1 test leaves w8a8 out, the unmarked suite skips it at run time
    result.assert_outcomes(passed=(4 + 8) + (4 + 4 + 8), skipped=4 + 4)
    ids = [line for line in gate.runpytest("--collect-only", "-q", "test_marked.py").stdout.lines if "::" in line]
    assert not [i for i in ids if "top1_delta[lenet5-digits-w8a8" in i] and len(ids) == 12


def test_tolerance_marker_overrides_one_test(gate):
    gate.makefile(".yaml", thresholds=thresholds())
    gate.makepyfile(test_override="""
        import pytest

        @pytest.mark.qrobust_tolerance(kl_mean=1e-12)
        def test_kl_mean(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "kl_mean")
    """)
    result = gate.runpytest("test_override.py")
    result.assert_outcomes(failed=4)
    assert "> 1e-12 at lenet5-digits-int8-x86" in result.stdout.str()


MALFORMED = [
    ("decision: maybe\n", "decision: must be one of point, strict, lenient"),
    ("defaults: {top1_delta: '0.01'}\n", "defaults.top1_delta: expected a number, got the string '0.01'"),
    ("defaults: {top1_delta: .nan}\n", "defaults.top1_delta: must be finite"),
    ("defaults: {top1_delta: .inf}\n", "defaults.top1_delta: must be finite"),
    ("defaults: {top1_delta: -0.1}\n", "defaults.top1_delta: must be >= 0"),
    ("defaults: {top1_delta: true}\n", "defaults.top1_delta: expected a number, got bool"),
    ("defaults: {top1_dleta: 0.1}\n", "defaults.top1_dleta: unknown key; did you mean 'top1_delta'?"),
    ("defaults: {accuracy: 0.1}\n", "defaults.accuracy: unknown key; allowed: agreement, cam_cc"),
    ("defaults: [1, 2]\n", "defaults: expected a mapping, got list"),
    ("defualts: {}\n", "defualts: unknown key; did you mean 'defaults'?"),
    ("seed: 1\nseed: 2\n", "duplicate key 'seed' (line 2)"),
    ("perturbations: {awgm: {levels: [0, 0.1]}}\n", "perturbations.awgm: unknown perturbation; did you mean 'awgn'"),
    ("perturbations: {awgn: {levels: [0, -0.1]}}\n", "perturbations.awgn.levels[1]: must be >= 0"),
    ("perturbations: {awgn: {levels: []}}\n", "perturbations.awgn.levels: expected a non-empty list"),
    ("perturbations: {awgn: {levels: [0, 0]}}\n", "perturbations.awgn.levels: duplicate levels"),
    ("perturbations: {occlusion_vertical: {levels: [0, 1.5]}}\n", "levels[1]: level=1.5: occlusion_vertical levels are whole"),
    ("perturbations: {jpeg: {levels: [0, 120]}}\n", "perturbations.jpeg.levels[1]: level=120.0: jpeg levels run from 0 to 99"),
    ("perturbations: {awgn: {levels: [0, 0.1], at: {0.3: {top1_delta: 0.1}}}}\n", "perturbations.awgn.at.0.3: level 0.3 is not in"),
    ("perturbations: {awgn: {levls: [0]}}\n", "perturbations.awgn.levls: unknown key; did you mean 'levels'?"),
    ("gate: {lenet5-digits-int9: {}}\n", "gate.lenet5-digits-int9: unknown pair 'lenet5-digits-int9'; did you mean"),
    ("gate: {lenet5-digits-int8-x86: {xfail: ''}}\n", "gate.lenet5-digits-int8-x86.xfail: expected a non-empty string"),
    ("gate: {lenet5-digits-int8-x86: {metrics: [kl_men]}}\n", "gate.lenet5-digits-int8-x86.metrics[0]: not a per-case metric: 'kl_men'; did you mean 'kl_mean'?"),
    ("gate: {lenet5-digits-int8-x86: {metrics: []}}\n", "gate.lenet5-digits-int8-x86.metrics: expected a non-empty list"),
    ("gate: {lenet5-digits-int8-x86: {tolerances: {kl_mean: '1e-2'}}}\n", "gate.lenet5-digits-int8-x86.tolerances.kl_mean: expected a number, got the string"),
    ("perturbations: {awgn: {levels: [0, 0.1]}}\ngate: {lenet5-digits-int8-x86: {perturbations: {awgn: {levels: [0, 0.3]}}}}\n",
     "gate.lenet5-digits-int8-x86.perturbations.awgn.levels: [0.3] not in the sweep's levels [0.0, 0.1]"),
    ("batch_size: 0\n", "batch_size: must be >= 1, got 0"),
    ("batch_size: 2.5\n", "batch_size: expected a whole number, got 2.5"),
    ("max_samples: many\n", "max_samples: expected a number, got the string 'many'"),
    ("replicates: 5\n", "replicates: must be >= 10"),
    ("f1_average: samples\n", "f1_average: must be one of macro, micro, weighted"),
    ("bitwidth: {pairs: [nope]}\n", "bitwidth.pairs[0]: unknown pair 'nope'"),
    ("latency: {pairs: [lenet5-digits-int8-x86], batch: -1}\n", "latency.batch: must be >= 1"),
    ("latency: {speed: 2}\n", "latency.speed: unknown key; did you mean 'speedup'?"),
    ("explanations: {pairs: [lenet5-digits-int8-x86], samples: 0, tolerances: {deletion_auc_delta: 0.01}}\n",
     "explanations.samples: must be >= 1"),
    ("cam: {method: scorecam}\n", "cam.method: must be one of auto, gradcam, gradcampp, eigencam"),
    ("!!python/object/apply:os.system ['touch pwned']\n", "not valid YAML"),
    ("defaults: {top1_delta: 0.01\n", "not valid YAML"),
    ("- just\n- a list\n", "(top level): expected a mapping, got list"),
    ("\xff\xfe bad bytes", "not UTF-8 text (byte 0)"),
]


@pytest.mark.parametrize("text,message", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_thresholds_exit_4_with_one_line(pytester, text, message):
    (pytester.path / "thresholds.yaml").write_bytes(text.encode("latin-1"))
    pytester.makepyfile(test_gate=SUITE)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.startswith("ERROR:")]
    assert len(errors) == 1 and "thresholds.yaml: " in errors[0] and message in errors[0], result.stderr.str()
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    assert not (pytester.path / "pwned").exists()
    assert "passed" not in result.stdout.str()


def test_all_skipped_gate_never_exits_0(gate):
    gate.makefile(".yaml", thresholds=thresholds(tolerances="{top5_delta: 0.01}"))
    result = gate.runpytest()
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*none produced a verdict (all skipped?)*"])


def test_empty_dataset_never_exits_0(gate):
    gate.makeconftest("""
        import torch
        from qrobust.data import DATASETS, ImageSet
        from qrobust.models import register_pair, load_pair, ModelPair
        import dataclasses

        def empty():
            return ImageSet("empty", torch.zeros(0, 1, 32, 32), torch.zeros(0, dtype=torch.long),
                            torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 10)

        if "empty" not in DATASETS:
            DATASETS.register("empty", empty)
            register_pair("lenet-empty", lambda: dataclasses.replace(load_pair("lenet5-digits-int8-x86"),
                                                                        name="lenet-empty", dataset="empty"))
    """)
    gate.makefile(".yaml", thresholds=thresholds(pair="lenet-empty"))
    result = gate.runpytest()
    assert result.ret == 1
    assert "dataset='empty': is empty" in result.stdout.str()


def test_unknown_pairs_option_is_a_usage_error(gate):
    gate.makefile(".yaml", thresholds=thresholds())
    result = gate.runpytest("--qrobust-pairs", "nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--qrobust-pairs: pair 'nope' is not gated by" in result.stderr.str()


def test_environment_variable_fallback(gate, monkeypatch):
    gate.makefile(".yaml", other=thresholds())
    monkeypatch.setenv("QROBUST_THRESHOLDS", "other.yaml")
    monkeypatch.setenv("QROBUST_REPORT", "elsewhere")
    gate.runpytest().assert_outcomes(passed=12)
    assert (gate.path / "elsewhere" / "report.json").exists()


REGISTER_VARIABLE = """
    import os
    from qrobust.models import register_pair
    from qrobust.models import zoo

    if "lenet-variable" not in __import__("qrobust.models").models.PAIRS:
        def build():
            import dataclasses
            pair = zoo._lenet_pair(os.environ.get("QROBUST_TEST_PRESET", "fake-w8a8"))
            return dataclasses.replace(pair, name="lenet-variable")
        register_pair("lenet-variable", build)
"""


def test_baseline_save_then_compare_passes_a_degraded_config_fails(gate, monkeypatch):
    gate.makeconftest(REGISTER_VARIABLE)
    gate.makefile(".yaml", thresholds=thresholds(pair="lenet-variable"))
    gate.runpytest("--qrobust-save-baseline", "base.json").assert_outcomes(passed=12)
    gate.runpytest("--qrobust-baseline", "base.json").assert_outcomes(passed=12)
    monkeypatch.setenv("QROBUST_TEST_PRESET", "fake-asym4")
    result = gate.runpytest("--qrobust-baseline", "base.json")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*kl_mean regressed from baseline*"])


def test_existing_baseline_is_not_overwritten_without_the_flag(gate):
    gate.makefile(".yaml", thresholds=thresholds())
    (gate.path / "base.json").write_text("precious")
    result = gate.runpytest("--qrobust-save-baseline", "base.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "baseline exists; pass --qrobust-overwrite-baseline" in result.stderr.str()
    assert (gate.path / "base.json").read_text() == "precious"
    gate.runpytest("--qrobust-save-baseline", "base.json", "--qrobust-overwrite-baseline").assert_outcomes(passed=12)
    assert json.loads((gate.path / "base.json").read_text())["values"]


def test_baseline_from_another_environment_is_refused_unless_asked(gate):
    gate.makefile(".yaml", thresholds=thresholds())
    gate.runpytest("--qrobust-save-baseline", "base.json").assert_outcomes(passed=12)
    data = json.loads((gate.path / "base.json").read_text())
    data["fingerprint"]["torch"] = "1.0.0"
    (gate.path / "base.json").write_text(json.dumps(data))
    result = gate.runpytest("--qrobust-baseline", "base.json")
    assert result.ret == 1 and "recorded in another environment" in result.stdout.str()
    gate.runpytest("--qrobust-baseline", "base.json", "--qrobust-baseline-any-env").assert_outcomes(passed=12)


def test_interrupted_run_leaves_the_previous_report_intact(gate):
    gate.makefile(".yaml", thresholds=thresholds())
    gate.runpytest().assert_outcomes(passed=12)
    before = (gate.path / "qrobust-report" / "report.json").read_text()
    gate.makepyfile(test_zz_interrupt="""
        def test_interrupt():
            raise KeyboardInterrupt
    """)
    result = gate.inline_run(no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert (gate.path / "qrobust-report" / "report.json").read_text() == before


def test_cam_gate_checks_int8_with_eigencam_and_puts_overlays_in_the_report(gate):
    gate.makefile(".yaml", thresholds=thresholds(tolerances="{cam_sim: 0.8, cam_cc: 0.45}"))
    gate.makepyfile(test_camgate="""
        def test_cam_sim(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "cam_sim")

        def test_cam_cc(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "cam_cc")
    """)
    gate.runpytest("test_camgate.py").assert_outcomes(passed=8)
    report = json.loads((gate.path / "qrobust-report" / "report.json").read_text())
    assert {c["details"]["method"] for c in report["cases"]} == {"eigencam"}
    assert all(c["value"] > 0.8 for c in report["cases"])
    assert (gate.path / "qrobust-report" / "report.html").read_text().count("data:image/png;base64,") >= 3


def test_explanations_gate_runs_deletion_and_insertion(gate):
    extra = ("explanations: {pairs: [lenet5-digits-int8-x86], samples: 8, steps: 10,\n"
             "               tolerances: {deletion_auc_delta: 0.05, insertion_auc_delta: 0.05, wsol_iou_delta: 0.1}}\n")
    gate.makefile(".yaml", thresholds=thresholds(extra=extra))
    gate.makepyfile(test_expl="""
        def test_explanations(qrobust_explanation_pair, qrobust_check):
            qrobust_check.explanations(qrobust_explanation_pair)
    """)
    result = gate.runpytest("-k", "explanations")
    assert result.ret == pytest.ExitCode.USAGE_ERROR  # digits have no boxes: WSOL cannot be judged, said at start
    assert ("explanations.tolerances.wsol_iou_delta: cannot be judged for lenet5-digits-int8-x86: its dataset "
            "'digits-test' has no bounding boxes") in result.stderr.str()
    gate.makefile(".yaml", thresholds=thresholds(extra=extra.replace(", wsol_iou_delta: 0.1", "")))
    gate.runpytest("-k", "explanations").assert_outcomes(passed=1)
    cases = json.loads((gate.path / "qrobust-report" / "report.json").read_text())["cases"]
    assert {c["metric"] for c in cases} == {"deletion_auc_delta", "insertion_auc_delta"}


@pytest.mark.slow
def test_xdist_gives_the_same_verdicts_and_report_as_serial(gate):
    pytest.importorskip("xdist")
    gate.makefile(".yaml", thresholds=thresholds())
    serial = gate.runpytest_subprocess("--qrobust-report", "serial")
    serial.assert_outcomes(passed=12)
    parallel = gate.runpytest_subprocess("-n", "2", "--qrobust-report", "parallel", "--junitxml=junit.xml")
    parallel.assert_outcomes(passed=12 + 3)  # a helper per unit shares its shards (qrobust.gate.slots)
    from test_outputs import junit  # JUnit properties survive -n: flat per check, suite ones from the controller

    cases, props = junit(gate.path / "junit.xml")
    assert cases["test_agreement[lenet5-digits-int8-x86-awgn-0.1]"]["qrobust_metric"] == "agreement"
    assert props["qrobust_seed"] == "0"
    a = json.loads((gate.path / "serial" / "report.json").read_text())
    b = json.loads((gate.path / "parallel" / "report.json").read_text())
    strip = lambda cases: [{k: v for k, v in c.items() if k != "details"} for c in cases]  # noqa: E731
    assert strip(a["cases"]) == strip(b["cases"])
    # whole evaluation units per worker (qrobust.scheduling): no case is evaluated twice
    assert a["forward_passes"]["perturbed_batches"] == b["forward_passes"]["perturbed_batches"]
    models = lambda report: {k: v for k, v in report["forward_passes"]["forward_passes"].items() if k != "probe"}  # noqa: E731
    assert models(a) == models(b)  # each worker probes the pairs it builds; the evaluation passes are the same
    assert len(b["forward_passes"]["pair_loads_per_process"]) == 2  # both workers had work
    assert all(count == 1 for loads in b["forward_passes"]["pair_loads_per_process"] for count in loads.values())
