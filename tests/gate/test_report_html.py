"""report.html: charts (tolerance steps, bands, marked points, axes, y-range), layout (failures first,
level 0 once, escaping), the template override and pytest-html extras, on a synthetic report."""
from __future__ import annotations

import json
import re

import pytest

from qrobust.gate.charts import Series, level_chart, min_span, nice_ticks, y_range
from qrobust.gate.html_report import TEMPLATE_ENV, comparison, render_html, unique_cases
from qrobust.gate.report import build_report, write_report

HOSTILE = "<script>alert(1)</script>"
LEVELS = (0, 0.2, 0.4, 0.6, 0.8)


def _case(pair, pert, level, metric, value, tolerance, verdict, direction=">=", interval=None, **extra):
    lo, hi = interval or (value - 0.01, value + 0.01)
    return {"test": f"test_{metric}", "pair": pair, "perturbation": pert, "level": level, "metric": metric,
            "direction": direction, "value": value, "interval": [lo, hi], "n": 450, "tolerance": tolerance,
            "verdict": verdict, "mode": "point", "failed_by": "tolerance" if verdict in ("fail", "xfail") else None,
            "margin": (value - tolerance) if direction == ">=" else (tolerance - value), "fragile": False,
            "flips_to_reverse": 3, "baseline": None,
            "context": {"top1_fp32": 0.95 - level / 10, "top1_quant": 0.94 - level / 5},
            "details": {"b": 30, "c": 4, "flips": 34}, **extra}


def synthetic_report() -> dict:
    """A gate with a failure whose tolerance changes by level (0.98 up to 0.6, 0.95 at 0.8), a passing
    perturbation, an expected failure and a hostile pair name."""
    cases = []
    for pert in ("contrast", "awgn"):
        for level in LEVELS:
            value = (0.939 if level == 0.8 else 0.999 - 0.02 * level) if pert == "contrast" else 0.999 - 0.001 * level
            tolerance = 0.95 if level == 0.8 else 0.98
            verdict = "fail" if value < tolerance else "pass"
            cases.append(_case("tiny-int8", pert, level, "agreement", value, tolerance, verdict))
            cases.append(_case("tiny-int8", pert, level, "top1_delta", 0.002, 0.01, "pass", "<="))
            cases.append(_case("tiny-asym2", pert, level, "top1_delta", 0.11 + level / 10, 0.01, "xfail", "<="))
            cases.append(_case(HOSTILE, pert, level, "kl_mean", 0.004, 0.02, "pass", "<="))
    env = {"torch": "2", "torchvision": "0", "cpu_capability": "AVX2", "threads": 2, "seed": 0, "decision": "point",
           "thresholds_sha256": "ab" * 32, "machine": "x86_64", "python": "3.11",
           "weights": {"tiny-int8": "cd" * 8},
           "pairs": {"tiny-int8": {"recipe": "x86 default", "engine": "x86", "kind": "int8",
                                   "cam": {"method": "eigencam", "fp32_layer": "conv2", "quantized_layer": "conv2"},
                                   "dataset": "digits", "samples": 450}}}
    return build_report(cases, env, {"forward_passes": {}}, "run0", ["pytest", "-q"],
                        thresholds_path="thresholds.yaml", duration_s=75.0)


def overlay(pair="tiny-int8", pert="contrast", level=0.8):
    import torch

    from qrobust.gate.html_report import thumbnail

    pixels, cam = torch.rand(1, 8, 8), torch.rand(8, 8)
    return {"pair": pair, "perturbation": pert, "level": level, "id": 7, "rmse": 0.3, "method": "eigencam",
            "top1_fp32": 3, "top1_quant": 8, "image": thumbnail(pixels), "fp32": thumbnail(pixels, cam),
            "quantized": thumbnail(pixels, cam.flip(0))}


@pytest.fixture(scope="module")
def page() -> str:
    return render_html(synthetic_report(), [overlay()])


def _svgs(text: str) -> list[str]:
    return re.findall(r"<svg .*?</svg>", text, re.S)


def _chart(text: str, title: str) -> str:
    return next(s for s in _svgs(text) if f'aria-label="{title}"' in s)


# ---- charts ----------------------------------------------------------------------------------------
def test_tolerance_is_a_step_per_level():
    page = render_html(synthetic_report())
    svg = _chart(page, "agreement — contrast")
    tol = re.search(r'<path class="tol" data-steps="(\d+)" d="([^"]+)"', svg)
    assert tol and int(tol.group(1)) == len(LEVELS)
    assert tol.group(2).count("H") == len(LEVELS)
    heights = {float(y) for y in re.findall(r"[MV](?:[\d.]+ )?([\d.]+)H", tol.group(2))}
    assert len(heights) == 2  # 0.98 up to 0.6, then 0.95: a riser, not the last level's value drawn across
    assert "0.98 at 0.6, 0.95 at 0.8" in tol.group(0) + svg


def test_band_and_failing_points_are_drawn():
    svg = _chart(render_html(synthetic_report()), "agreement — contrast")
    assert '<polygon class="band"' in svg
    assert len(re.findall(r'class="m-fail"', svg)) == 1  # only level 0.8 fails
    assert "fail: agreement 0.939 [0.929, 0.949] at 0.8" in svg


def test_inconclusive_and_expected_failures_are_marked():
    svg = level_chart("t", "x", "y", [Series("m", {0: 1.0, 1: 0.9, 2: 0.8}, marks={1: "inconclusive", 2: "xfail"})])
    assert svg.count('class="m-inconclusive"') == 1 and svg.count('class="m-xfail"') == 1


def test_axes_are_titled_with_units_and_ticks_are_round():
    svg = _chart(render_html(synthetic_report()), "agreement — contrast")
    assert "contrast: contrast reduction (0 = none, 1 = flat)" in svg
    assert "agreement (fraction of samples)" in svg
    ticks = [float(t) for t in re.findall(r'<text class="yt"[^>]*>([^<]+)</text>', svg)]
    assert 4 <= len(ticks) <= 6
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1 and re.fullmatch(r"[125]0*|2\.5|0\.0*[125]|0\.0*25", f"{steps.pop():g}")
    assert svg.count("M58 ") >= 4  # one gridline per tick


@pytest.mark.parametrize("lo,hi", [(0, 1), (0.9978, 1.0), (-0.003, 0.012), (3, 47), (0.931, 0.999)])
def test_nice_ticks_cover_the_range_with_4_to_6_round_steps(lo, hi):
    ticks = nice_ticks(lo, hi)
    assert 4 <= len(ticks) <= 6 and ticks[0] <= lo and ticks[-1] >= hi


def test_one_sample_does_not_fill_the_chart():
    values = [1.0, 1.0, 1.0 - 1 / 450]  # agreement: one sample of 450 changed, no tolerance drawn
    lo, hi = y_range(values, min_span(values))
    assert (1 / 450) / (hi - lo) < 0.05
    assert y_range([0.0, 0.5], min_span([0.0, 0.5])) == (0.0, 0.5)  # a real change keeps its own range


def test_a_single_level_draws_no_chart():
    assert level_chart("t", "x", "y", [Series("m", {0: 1.0})]) == ""


# ---- layout ----------------------------------------------------------------------------------------
def test_failures_come_first_with_their_decisive_comparison(page):
    first_card = page.index('class="card f fail"')
    assert first_card < page.index('id="caught"') < page.index('id="summary"') < page.index('id="charts"')
    card = page[first_card:page.index("</div>\n", page.index("cmp", first_card))]
    assert "agreement 0.939 &lt; 0.95" in card and "n <b>450</b>" in card and "b / c <b>30 / 4</b>" in card
    assert "3 samples from reversing" in card


def test_expected_failures_show_what_was_caught(page):
    caught = page[page.index('id="caught"'):page.index('id="summary"')]
    assert "tiny-asym2" in caught and "top1_delta 0.19 &gt; 0.01" in caught


def test_an_expected_failure_that_meets_a_tolerance_is_not_shown_as_caught():
    met = _case("p", "x", 0, "agreement", 0.99, 0.98, "xfail")
    assert comparison(met) == "agreement 0.99 >= 0.98"
    page = render_html({**synthetic_report(), "cases": [met]})
    assert "No expected failure" in page[page.index('id="caught"'):page.index('id="summary"')]
    assert comparison({**met, "value": 0.97999, "margin": -0.00001}) == "agreement 0.97999 < 0.98"


def test_summary_says_direction_interval_and_n_failures_first(page):
    summary = page[page.index('id="summary"'):page.index('id="charts"')]
    rows = re.findall(r'<tr class="(\w+) f"', summary)
    assert rows[0] == "fail" and rows.index("xfail") < rows.index("pass")
    assert "minimum" in summary and "maximum" in summary and "[0.929, 0.949]" in summary


def test_level_zero_is_shown_once_per_pair(page):
    report = synthetic_report()
    unique = unique_cases(report["cases"])
    assert len(report["cases"]) - len(unique) == 4  # one repeat per pair and metric (2 perturbations)
    checks = page[page.index('id="checks"'):page.index('id="provenance"')]
    pair = checks[checks.index('<tbody data-p="tiny-int8">'):]
    pair = pair[:pair.index("</tbody>")]
    assert re.findall(r"<td>(\w+)<td>0<td>agreement", pair) == ["clean"]
    assert len(re.findall(r"<tr data-v=", pair)) == len(unique_cases([c for c in report["cases"] if c["pair"] == "tiny-int8"]))


def test_hostile_names_are_escaped(page):
    assert HOSTILE not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<script>") == 1  # the page's own filter script


def test_overlays_sit_with_their_failing_case(page):
    card = page[page.index('class="card f fail"'):page.index('id="caught"')]
    assert card.count("data:image/png;base64,") == 3 and "predicts 3" in card and "predicts 8" in card
    assert 'aria-label="CAM colour scale"' in card


def test_provenance_block(page):
    prov = page[page.index('id="provenance"'):]
    for text in ("1 min 15 s", "thresholds.yaml", "ab" * 32, "pytest -q", "eigencam: conv2", "x86 default"):
        assert text in prov


def test_no_network_reference(page):
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page


def test_comparison_reads_as_the_violated_inequality():
    fail = _case("p", "x", 1, "agreement", 0.9244, 0.95, "fail")
    assert comparison(fail) == "agreement 0.9244 < 0.95"
    assert comparison({**fail, "verdict": "pass", "value": 0.99, "margin": 0.04}) == "agreement 0.99 >= 0.95"
    assert comparison({**fail, "verdict": "inconclusive"}) == "agreement 0.9244 >= 0.95 unproven"


def test_template_can_be_replaced(tmp_path, monkeypatch):
    mine = tmp_path / "mine.html.j2"
    mine.write_text("<p>{{ checks }} checks, {{ counts.fail }} failing{% for c in cards %} {{ c.pair }}{% endfor %}</p>")
    assert render_html(synthetic_report(), template=mine) == "<p>36 checks, 1 failing tiny-int8</p>"
    monkeypatch.setenv(TEMPLATE_ENV, str(mine))
    assert render_html(synthetic_report()).startswith("<p>36 checks")
    mine.write_text("{{ run_id }}{{ '<b>' }}")
    assert render_html(synthetic_report(), template=mine) == "run0&lt;b&gt;"  # autoescaped


def test_shipped_template_is_package_data():
    from importlib.resources import files

    assert files("qrobust.gate").joinpath("templates/report.html.j2").is_file()
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "templates/*.j2" in data["tool"]["setuptools"]["package-data"]["qrobust.gate"]


def test_write_report_writes_the_page_with_the_json(tmp_path):
    json_path, html_path = write_report(tmp_path, synthetic_report(), [overlay()])
    assert json.loads(json_path.read_text())["run_id"] == "run0"
    assert 'content="run0"' in html_path.read_text()


# ---- pytest-html -----------------------------------------------------------------------------------
def test_failing_checks_get_pytest_html_extras():
    pytest.importorskip("pytest_html", reason="pytest-html not installed: no extras to attach")
    from qrobust.gate.html_report import case_extras

    report = synthetic_report()
    failing = next(c for c in report["cases"] if c["verdict"] == "fail")
    extras = case_extras(failing, report["cases"], [overlay()])
    kinds = [e["format_type"] for e in extras]
    assert kinds.count("html") == 1 and kinds.count("image") == 2
    assert "<svg" in extras[0]["content"] and 'class="tol"' in extras[0]["content"]
    assert "agreement 0.939 &lt; 0.95" in extras[0]["content"]


def test_pytest_html_report_carries_the_chart_of_a_failing_test(pytester):
    pytest.importorskip("pytest_html", reason="pytest-html not installed: no extras to attach")
    from helpers import SUITE, thresholds

    pytester.makefile(".yaml", thresholds=thresholds(pair="lenet5-digits-asym2", tolerances="{top1_delta: 0.01}"))
    pytester.makepyfile(test_gate=SUITE.split("def test_agreement")[0])
    pytester.runpytest("-p", "no:cacheprovider", "--html=page.html", "--self-contained-html")
    page = (pytester.path / "page.html").read_text()
    assert "top1_delta \\u2014 awgn" in page and "tol\\&#34;" in page  # the chart, inside pytest-html's JSON
