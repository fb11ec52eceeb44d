"""The catalogue drives the gate: a tolerance on any metric of the catalogue is judged (a record in
report.json) or refused with one line naming the metric; numbers are YAML 1.2 and bounded at load."""
import json
import textwrap

import pytest

from qrobust.errors import ConfigError
from qrobust.gate.config import load_thresholds
from qrobust.metrics.catalog import METRICS

PAIR = "lenet5-digits-int8-x86"
# refused at load on the built-in LeNet (test_which_metrics_are_refused_on_the_built_in_lenet_and_why says why)
REFUSED = {"cam_sim_gt_delta", "cam_cc_gt_delta", "cam_kld_gt_delta", "wsol_iou_delta", "quantizer_violations"}
BASE = """\
decision: point
max_samples: 30
replicates: 50
perturbations: {awgn: {levels: [0]}}
"""


def tolerance_for(metric: str) -> float:
    """A tolerance the metric can meet and miss (its default, else a value inside its range)."""
    info = METRICS[metric]
    if info.default_tolerance is not None and not info.tolerance_problem(info.default_tolerance):
        return info.default_tolerance
    low, high = info.values
    return max(0.0, low) + 0.5 if high > 1 else 0.5


def gate_file(metric: str) -> str:
    """A thresholds file setting one tolerance on ``metric``, where the metric belongs."""
    t = tolerance_for(metric)
    family = METRICS[metric].family
    if family == "explanation":
        return BASE + f"gate: {{{PAIR}: {{}}}}\nexplanations: {{pairs: [{PAIR}], samples: 6, steps: 4, tolerances: {{{metric}: {t}}}}}\n"
    if family == "latency":
        return BASE + f"gate: {{{PAIR}: {{}}}}\nlatency: {{pairs: [{PAIR}], batch: 4, rounds: 3, {metric}: {t}}}\n"
    if family == "quantizer":
        return BASE + f"gate: {{{PAIR}: {{tolerances: {{{metric}: {t}}}}}}}\n"
    tau = ", operating_point: 0.5" if metric == "operating_point_flips" else ""  # the threshold it is judged at
    return BASE + f"gate: {{{PAIR}: {{tolerances: {{{metric}: {t}}}, metrics: [{metric}]{tau}}}}}\n"


@pytest.mark.slow
@pytest.mark.parametrize("metric", list(METRICS))
def test_a_tolerance_on_every_metric_is_judged_or_refused_with_one_line(pytester, metric):
    """Before, logit_sqnr_db, logit_cosine and the *_gt_delta tolerances were dropped without a word."""
    pytester.makefile(".yaml", thresholds=gate_file(metric))
    result = pytester.runpytest("--pyargs", "qrobust.suites", "--qrobust-thresholds", "thresholds.yaml",
                                f"--rootdir={pytester.path}", "-p", "no:cacheprovider", "-k", f"{metric} or speedup or "
                                "explanations or quantizer")
    errors = [line for line in result.stderr.lines if line.startswith("ERROR")]
    if result.ret == pytest.ExitCode.USAGE_ERROR:
        assert len(errors) == 1 and metric in errors[0], result.stderr.str()
        assert metric in REFUSED and "judged by no collected test" not in errors[0], errors[0]  # not a dropped metric
        return
    report = json.loads((pytester.path / "qrobust-report" / "report.json").read_text())
    judged = [c for c in report["cases"] if c["metric"] == metric]
    assert judged and all(c["tolerance"] == tolerance_for(metric) for c in judged), result.stdout.str()[-2000:]
    assert all(c["verdict"] in ("pass", "fail", "inconclusive") for c in judged)


def test_which_metrics_are_refused_on_the_built_in_lenet_and_why(tmp_path):
    """The refusals the test above accepts, spelled out: the ground-truth metrics need saliency maps and
    WSOL boxes the digits do not have, and quantizer_violations is implied for every gated pair, never set."""
    from qrobust.session import Options, QrobustSession

    refused = {}
    for metric in METRICS:
        path = tmp_path / f"{metric}.yaml"
        path.write_text(gate_file(metric))
        try:
            QrobustSession(Options(thresholds=str(path)))  # loads and plans; builds nothing
        except ConfigError as exc:
            refused[metric] = str(exc).split(": ", 1)[1]
    assert set(refused) == REFUSED
    path = tmp_path / "untold.yaml"
    path.write_text(gate_file("operating_point_flips").replace(", operating_point: 0.5", ""))
    with pytest.raises(ConfigError, match="operating_point_flips needs a deployment threshold: set operating_point"):
        QrobustSession(Options(thresholds=str(path)))
    assert refused["wsol_iou_delta"].endswith("explanations.tolerances.wsol_iou_delta: cannot be judged for "
                                              f"{PAIR}: its dataset 'digits-test' has no bounding boxes")
    assert refused["cam_sim_gt_delta"].endswith("cam_sim_gt_delta cannot be judged: its dataset 'digits-test' has "
                                                "no ground-truth saliency maps")
    assert refused["quantizer_violations"].endswith("quantizer_violations is not judged here: no file sets it: every "
                                                    "gated pair's quantizers must keep their properties (0 violations)")


@pytest.mark.parametrize("text, value", [("kl_mean: 1e-3", 0.001), ("kl_mean: 5E-2", 0.05), ("kl_mean: 2.5e-3", 0.0025),
                                         ("kl_mean: .5e-1", 0.05)])
def test_yaml_1_2_exponent_floats_are_numbers(tmp_path, text, value):
    """PyYAML reads YAML 1.1, whose floats need a dot: 1e-3 was the string '1e-3' ("remove the quotes")."""
    path = tmp_path / "t.yaml"
    path.write_text(f"defaults: {{{text}}}\nperturbations: {{awgn: {{levels: [0]}}}}\ngate: {{{PAIR}: {{}}}}\n")
    assert load_thresholds(path).defaults["kl_mean"] == value


@pytest.mark.parametrize("text, message", [
    ("replicates: 1000000000", "replicates: must be <= 100000, got 1000000000"),
    ("seed: 1180591620717411303424", "seed: must be <= 4.29497e+09"),
    ("batch_size: 100000", "batch_size: must be <= 4096"),
    ("defaults: {top1_delta: 1.0e+308}", "defaults.top1_delta: 1e+308: no value of top1_delta can miss it"),
    ("defaults: {agreement: 1.5}", "defaults.agreement: 1.5: no value of agreement can meet it"),
    ("defaults: {agreement: 0}", "defaults.agreement: 0: no value of agreement can miss it"),
    ("defaults: {cam_cc: .inf}", "defaults.cam_cc: must be finite"),
    ("defaults: {speedup: 1.0}", "defaults.speedup: speedup is not judged here: it goes in the latency: section"),
    ("latency: {pairs: [" + PAIR + "], speedup: 0}", "latency.speedup: 0: no value of speedup can miss it"),
    ("latency: {pairs: [" + PAIR + "], rounds: 1000000}", "latency.rounds: must be <= 10000"),
    ("explanations: {pairs: [" + PAIR + "], steps: 0, tolerances: {deletion_auc_delta: 0.1}}", "explanations.steps: must be >= 1"),
])
def test_numbers_no_run_can_honour_are_one_line_at_load(tmp_path, text, message):
    """Before: a billion replicates allocated 16 GB (291 lines of tracebacks), seed 2**70 was blamed on the
    pair, a 1e308 tolerance crashed in the statistics."""
    path = tmp_path / "t.yaml"
    path.write_text(textwrap.dedent(f"""\
        perturbations: {{awgn: {{levels: [0]}}}}
        gate: {{{PAIR}: {{}}}}
        """) + text + "\n")
    with pytest.raises(ConfigError) as info:
        load_thresholds(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_cli_seed_beyond_the_generators_range_is_one_line():
    import argparse

    from qrobust._options import BY_NAME

    with pytest.raises(argparse.ArgumentTypeError, match="must be <= 4294967295, got 1180591620717411303424"):
        BY_NAME["seed"].parse(str(2**70))


LAYER_GATE = """\
max_samples: 30
perturbations: {awgn: {levels: [0]}}
defaults: {kl_mean: 0.1, clip_excess: 0.01}
pairs:
  lenet-ort:
    builder: qrobust.models.lenet:lenet5_digits
    preset: ort-int8
    calibration: {dataset: digits-train, samples: 64}
    num_classes: 10
    preprocess: {resolution: [32, 32], mean: [0.5], std: [0.5]}
    dataset: digits-test
gate:
  lenet-ort: {}
  lenet5-digits-int8-x86: {}
"""


def test_layer_metrics_on_a_runtime_twin_are_left_out_with_the_reason_or_refused(tmp_path):
    """ONNX Runtime runs the twin: no torch layer to hook. A file-wide clip_excess skips it, saying why; set
    for the pair itself it is a usage error naming the pair (never a check that silently measures nothing)."""
    from qrobust.session import Options, QrobustSession

    path = tmp_path / "gate.yaml"
    path.write_text(LAYER_GATE)
    plan = QrobustSession(Options(thresholds=str(path))).plan
    assert [(p, m) for p, m, _ in plan.not_applicable] == [("lenet-ort", "clip_excess")]
    assert "no quantized torch layers to hook" in plan.not_applicable[0][2]
    assert {c.pair for c in plan.cases if "clip_excess" in c.tolerances} == {"lenet5-digits-int8-x86"}
    path.write_text(LAYER_GATE.replace("  lenet-ort: {}", "  lenet-ort: {tolerances: {layer_sqnr_db: 30}}"))
    with pytest.raises(ConfigError, match="gate.lenet-ort: layer_sqnr_db cannot be judged: its twin has no quantized"):
        QrobustSession(Options(thresholds=str(path)))
