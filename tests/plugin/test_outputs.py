"""What CI systems read: flat JUnit properties (also under -n), suite properties, the Markdown summary,
and report.json's metadata."""
import json
import xml.etree.ElementTree as ET

import pytest

from qrobust.gate.report import REPORT_SCHEMA
from helpers import SUITE, thresholds

pytestmark = pytest.mark.usefixtures("warm")


@pytest.fixture(scope="module")
def warm():
    from qrobust.models import load_pair

    load_pair("lenet5-digits-asym2")


def junit(path):
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")} for c in suite.iter("testcase")}
    props = {p.get("name"): p.get("value") for p in suite.find("properties") or []}
    return cases, props


def test_junit_has_flat_properties_and_suite_properties(pytester):
    """(Under -n too: tests/plugin/test_plugin.py's xdist test reads the same properties.)"""
    pytester.makefile(".yaml", thresholds=thresholds(pair="lenet5-digits-asym2"))
    pytester.makepyfile(test_gate=SUITE)
    pytester.runpytest("-p", "no:cacheprovider", "--junitxml=junit.xml")
    cases, props = junit(pytester.path / "junit.xml")
    case = cases["test_top1_delta[lenet5-digits-asym2-awgn-0.1]"]
    assert case["qrobust_metric"] == "top1_delta" and case["qrobust_direction"] == "<="
    assert case["qrobust_verdict"] == "fail" and float(case["qrobust_tolerance"]) == 0.01
    assert float(case["qrobust_interval_low"]) < float(case["qrobust_value"]) < float(case["qrobust_interval_high"])
    assert case["qrobust_n"] == "120" and "qrobust_case" not in case  # no JSON blob
    assert props["qrobust_seed"] == "0" and len(props["qrobust_thresholds_sha256"]) == 64
    assert props["qrobust_run_id"] == json.loads((pytester.path / "qrobust-report" / "report.json").read_text())["run_id"]


def test_markdown_summary_for_a_pull_request(pytester, monkeypatch):
    jsonschema = pytest.importorskip("jsonschema")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(pytester.path / "step-summary.md"))
    (pytester.path / "step-summary.md").write_text("earlier step\n")
    pytester.makefile(".yaml", thresholds=thresholds(pair="lenet5-digits-asym2"))
    pytester.makepyfile(test_gate=SUITE)
    pytester.runpytest("-p", "no:cacheprovider", "--qrobust-markdown", "summary.md")
    text = (pytester.path / "summary.md").read_text()
    assert text.startswith("## qrobust gate: FAILED\n") and "### Failures" in text
    assert "| lenet5-digits-asym2 / awgn @ 0.1 top1_delta |" in text and "| tolerance |" in text
    assert "### Worst case per pair and metric" in text and "Full report: `" in text
    step = (pytester.path / "step-summary.md").read_text()
    assert step.startswith("earlier step\n## qrobust gate: FAILED")  # appended, never replaced
    report = json.loads((pytester.path / "qrobust-report" / "report.json").read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["schema_version"] == 1 and report["qrobust_version"] and report["timestamp"].endswith("+00:00")
    assert "--qrobust-markdown" in report["command"]
