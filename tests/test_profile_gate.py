"""The gate's profile (benchmarks/profile_gate.py): each sampled stack lands in the stage that owns it, main
threads only and every process of an xdist run, and a real ``qrobust run`` under py-spy shows the stages
a gate must spend time in. (The figures themselves live in the README's Performance section.)"""
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def profile_gate(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import profile_gate
    return profile_gate


RUN = ["_run_module_as_main (<frozen runpy>:198)", "main (qrobust/cli.py:130)", "pytest_runtest_call (_pytest/runner.py:9)"]
CASE = RUN + ["Evaluator._run (qrobust/gate/engine.py:290)"]
FEED = ["feed (qrobust/placement.py:40)", "Module._call_impl (torch/nn/modules/module.py:1786)"]


@pytest.mark.parametrize("frames, stage", [
    (CASE + FEED + ["LeNet5.forward (qrobust/models/lenet.py:30)"], "forward: FP32"),
    (CASE + FEED + ["Conv2d.forward (torch/ao/nn/quantized/modules/conv.py:550)"], "forward: twin"),
    (CASE + FEED + ["FakeQuantized.forward (qrobust/quant/quantizer.py:88)"], "forward: twin"),
    (CASE + ["compute_cams (qrobust/explain/cam.py:169)"] + FEED, "forward: FP32"),  # one forward serves both
    (CASE + ["compute_cams (qrobust/explain/cam.py:172)", "_engine_run_backward (torch/autograd/graph.py:1072)"],
     "CAM (maps, gradients)"),
    (CASE + ["eigen_projection (qrobust/explain/cam.py:230)"], "CAM (maps, gradients)"),
    (CASE + ["Evaluator._perturb (qrobust/gate/engine.py:330)"] + FEED, "perturb"),  # FGSM's gradient pass
    (CASE + ["awgn (qrobust/data/perturbations.py:61)"], "perturb"),
    (CASE + ["BootstrapMean.update (qrobust/metrics/stats.py:170)"], "statistics (bootstrap, intervals)"),
    (CASE + FEED + ["Conv2d.forward (torch/ao/nn/quantized/modules/conv.py:550)", "keep (qrobust/quant/diagnosis.py:69)"],
     "per-layer diagnosis"),  # a diagnosis hook inside the gate's forward
    (CASE + ["kl_per_sample (qrobust/metrics/classification.py:20)"], "per-sample metrics"),
    (CASE + ["ImageReader.read (qrobust/data/folders.py:90)", "Image.open (PIL/Image.py:3400)"], "decode"),
    (CASE, "evaluation loop"),
    (RUN + ["PairCache._build (qrobust/gate/pairs.py:123)", "convert_int8 (qrobust/quant/convert.py:262)"] + FEED
     + ["HistogramObserver.forward (torch/ao/quantization/observer.py:1320)"], "build pairs (load, calibrate, convert)"),
    (RUN + ["check_quantizer (qrobust/quant/properties.py:80)", "run_test (hypothesis/core.py:900)"],
     "quantizer properties (Hypothesis)"),
    (RUN + ["write_report (qrobust/gate/report.py:120)"], "verdicts and report"),
    (RUN + ["_find_and_load (<frozen importlib._bootstrap>:1176)", "<module> (torch/__init__.py:1)"], "imports and start-up"),
    (RUN, "pytest and collection"),
])
def test_each_stack_lands_in_the_stage_that_owns_it(profile_gate, frames, stage):
    assert profile_gate.stage_of(frames) == stage


def test_raw_stacks_count_main_threads_of_every_process(profile_gate):
    main = 'process 10:"python -m qrobust run -n 2"'
    worker = main + ';process 12:"python -c import sys\nexec(eval(sys.stdin.readline()))"'  # a newline in a cmdline
    raw = "\n".join([
        f"{main};thread (10): MainThread;" + ";".join(RUN) + " 7",
        f"{main};thread (11): Thread-1;" + ";".join(CASE) + " 5",  # not a main thread: left out
        f"{worker};thread (12);" + ";".join(CASE + ["awgn (qrobust/data/perturbations.py:61)"]) + " 3",
        f"{worker};thread (12);" + ";".join(CASE) + " 2",
    ])
    samples = profile_gate.parse_raw(raw)
    assert samples == {10: {"pytest and collection": 7}, 12: {"perturb": 3, "evaluation loop": 2}}
    lines = profile_gate.table(1.0, samples, rate=10)  # 2 processes x 1 s: 1.2 s seen, 0.8 s idle
    assert lines[3:] == ["| idle | 0.8 | 40.0% |", "| pytest and collection | 0.7 | 35.0% |",
                         "| perturb | 0.3 | 15.0% |", "| evaluation loop | 0.2 | 10.0% |"]
    # more samples than the wall time holds (py-spy's clock under load): shares of what it saw, no idle
    assert profile_gate.table(1.0, {10: {"perturb": 12, "evaluation loop": 3}}, rate=10)[3:] == [
        "| perturb | 1.2 | 80.0% |", "| evaluation loop | 0.3 | 20.0% |", "| idle | 0.0 | 0.0% |"]


GATE = """\
decision: point
perturbations: {awgn: {levels: [0, 0.1]}}
defaults: {top1_delta: 0.5, kl_mean: 1.0}
gate: {lenet5-digits-w8a8: {}}
"""


@pytest.mark.slow
def test_a_real_gate_run_under_py_spy_shows_where_its_time_went(profile_gate, tmp_path, capsys):
    (tmp_path / "gate.yaml").write_text(GATE)
    lines = profile_gate.main(["--rate", "200", "--", str(tmp_path / "gate.yaml")])
    shares = {line.split(" | ")[0][2:]: float(line.split(" | ")[2].rstrip("% |")) for line in lines[4:]}
    assert {"forward: FP32", "forward: twin", "perturb", "statistics (bootstrap, intervals)",
            "imports and start-up"} <= shares.keys()
    assert abs(sum(shares.values()) - 100) < 1


def test_a_gate_that_cannot_start_is_no_profile(profile_gate, tmp_path):
    (tmp_path / "gate.yaml").write_text(GATE.replace("0.5", "5"))  # a top1_delta no value can miss
    with pytest.raises(SystemExit, match="gated nothing or had errors"):
        profile_gate.main(["--", str(tmp_path / "gate.yaml")])
