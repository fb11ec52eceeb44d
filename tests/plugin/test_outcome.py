"""One source of truth for a run's outcome: report.json's records decide the HTML, Markdown and terminal
headlines, and they agree with JUnit's counts and the exit code, for a clean run, a pair that cannot be
built and a check that crashes (before, both failing runs exited 1 under reports that said PASSED)."""
import json
import re
import xml.etree.ElementTree as ET

import pytest

from helpers import SUITE, thresholds

CONFTEST = """
    import torch
    from helpers import make_pair, small_net, synthetic_set
    from qrobust.data import DATASETS
    from qrobust.models import PAIRS, register_pair

    class Boom(torch.nn.Module):
        '''A twin that answers the probe's first batch and crashes on the next.'''
        def __init__(self, twin):
            super().__init__()
            self.twin, self.calls = twin, 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("boom: the twin crashed")
            return self.twin(x)

    def unbuildable():
        raise ValueError("checkpoint does not fit resnet18")

    def crashing():
        pair = make_pair("crashing", small_net(4))
        pair.quantized = Boom(pair.quantized)
        return pair

    if "unbuildable" not in PAIRS:
        register_pair("unbuildable", unbuildable)
        register_pair("crashing", crashing)
        register_pair("layerless", lambda: make_pair("layerless", small_net(4)))  # no CAM layer, facts unknown
    if "synthetic" not in DATASETS:
        DATASETS.register("synthetic", lambda: synthetic_set(40))
"""


def outcome(pytester, pair: str) -> dict:
    pytester.makefile(".yaml", thresholds=thresholds(pair=pair))
    result = pytester.runpytest("-p", "no:cacheprovider", "--junitxml=junit.xml", "--qrobust-markdown=summary.md")
    report = json.loads((pytester.path / "qrobust-report" / "report.json").read_text())
    html = (pytester.path / "qrobust-report" / "report.html").read_text()
    suite = ET.parse(pytester.path / "junit.xml").getroot().find("testsuite")
    failing_tests = {c["test"] for c in report["cases"] if c["verdict"] in ("fail", "error")}
    return {
        "exit": int(result.ret),
        "json": "PASSED" if report["passed"] else "FAILED",
        "html": re.search(r"<h1>qrobust gate: <span[^>]*>(\w+)</span>", html).group(1),
        "markdown": (pytester.path / "summary.md").read_text().splitlines()[0].removeprefix("## qrobust gate: "),
        "terminal": re.search(r"qrobust gate: (PASSED|FAILED)", result.stdout.str()).group(1),
        "junit_failing": int(suite.get("failures")) + int(suite.get("errors")),
        "tests_with_failing_records": len(failing_tests),
        "summary": report["summary"], "errors": [c.get("error") for c in report["cases"] if c["verdict"] == "error"],
        "stdout": result.stdout.str(),
    }


def assert_agree(found: dict, passed: bool) -> None:
    word = "PASSED" if passed else "FAILED"
    assert (found["json"], found["html"], found["markdown"], found["terminal"]) == (word,) * 4, found["stdout"][-2000:]
    assert found["exit"] == (0 if passed else 1)
    assert found["junit_failing"] == found["tests_with_failing_records"]  # each failing test has its failing records
    assert (found["junit_failing"] == 0) is passed and (found["summary"]["failing"] == 0) is passed


def test_a_clean_run_passes_everywhere(pytester):
    pytester.makepyfile(test_gate=SUITE)
    found = outcome(pytester, "lenet5-digits-int8-x86")
    assert_agree(found, passed=True)
    assert found["summary"]["error"] == 0 and found["summary"]["pass"] == 12


def test_a_pair_that_cannot_be_built_fails_everywhere_with_its_error_records(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_gate=SUITE)
    found = outcome(pytester, "unbuildable")
    assert_agree(found, passed=False)
    assert found["summary"]["error"] == found["summary"]["total"] == 12
    assert set(found["errors"]) == {"pair unbuildable cannot be gated: checkpoint does not fit resnet18"}


def test_a_metric_the_built_pair_cannot_compute_is_an_error_saying_why(pytester):
    """A registered pair's facts are unknown until it is built: a CAM tolerance on a pair without a CAM
    layer is planned, and each of its checks is an error with the plan's own reason (PairFacts.cannot)."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_gate="def test_cam(qrobust_case, qrobust_check):\n    qrobust_check(qrobust_case, 'cam_sim')\n")
    pytester.makefile(".yaml", thresholds=thresholds(pair="layerless", tolerances="{cam_sim: 0.5}"))
    result = pytester.runpytest("-p", "no:cacheprovider")
    report = json.loads((pytester.path / "qrobust-report" / "report.json").read_text())
    assert result.ret == 1 and report["summary"]["error"] == report["summary"]["total"] == 4
    assert {c["error"] for c in report["cases"]} == {
        "cam_sim cannot be judged for pair 'layerless': it has no CAM target layer (set target_layer, or cam: "
        "{method: occlusion}, which needs none)"}


def test_a_crashed_check_fails_everywhere_with_its_error_records(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_gate=SUITE)
    found = outcome(pytester, "crashing")
    assert_agree(found, passed=False)
    assert found["summary"]["error"] > 0
    assert all(e.startswith("the check crashed: boom: the twin crashed") for e in found["errors"])


def test_a_test_failing_after_its_checks_passed_fails_everywhere(pytester):
    """A user's own assertion after passing checks, and a failing test that judges none of the plan's
    checks: each gets error records, so the reports do not say PASSED beside exit 1."""
    pytester.makepyfile(test_gate=SUITE + """

def test_own_assertion(qrobust_case, qrobust_check):
    qrobust_check(qrobust_case, "top1_delta")
    assert False, "the user's own check"


def test_no_checks(qrobust_check):
    raise RuntimeError("fails before any check")
""")
    found = outcome(pytester, "lenet5-digits-int8-x86")
    assert_agree(found, passed=False)
    assert found["tests_with_failing_records"] == 4 + 1  # test_own_assertion's four cases and test_no_checks
    assert found["summary"]["pass"] == 12 + 4  # the suite's checks and test_own_assertion's passing ones


def test_a_run_whose_gate_tests_judge_nothing_fails_in_junit_too(pytester):
    """Every gate test skipped: no verdict, so the run fails, and JUnit lists it as the qrobust::gate test."""
    pytester.makepyfile(test_gate="""
        import pytest

        @pytest.mark.skip(reason="switched off")
        def test_top1_delta(qrobust_case, qrobust_check):
            qrobust_check(qrobust_case, "top1_delta")
    """)
    pytester.makefile(".yaml", thresholds=thresholds(tolerances="{top1_delta: 0.01}"))
    result = pytester.runpytest("-p", "no:cacheprovider", "--junitxml=junit.xml")
    assert result.ret == 1
    report = json.loads((pytester.path / "qrobust-report" / "report.json").read_text())
    assert report["passed"] is False and [c["test"] for c in report["cases"] if c["verdict"] == "error"] == ["qrobust::gate"]
    suite = ET.parse(pytester.path / "junit.xml").getroot().find("testsuite")
    assert int(suite.get("failures")) == 1
    assert suite.find("testcase[@classname='qrobust'][@name='gate']") is not None
    result.stdout.fnmatch_lines(["*qrobust: FAILED: 4 gate tests ran but none produced a verdict*"])


@pytest.fixture(autouse=True)
def _lenet_built():
    from qrobust.models import load_pair

    load_pair("lenet5-digits-int8-x86")
