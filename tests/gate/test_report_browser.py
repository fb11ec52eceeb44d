"""report.html in a real browser (headless Chromium through Playwright): no network, the failing case in
the first 1400x900 viewport, a tolerance step per level, titled axes, working filters. Skips with the
reason where Playwright or Chromium is missing (.ci/run installs Debian's chromium)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from qrobust.gate.report import write_report

from test_report_html import LEVELS, overlay, synthetic_report

TOOL = Path(__file__).parents[2] / "tools" / "screenshot_report.py"


def _tool():
    spec = importlib.util.spec_from_file_location("screenshot_report", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def opened(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install '.[test]')")
    tool = _tool()
    if tool.chromium() is None:
        pytest.skip("no Chromium: apt-get install chromium, or set $QROBUST_CHROMIUM")
    _, html_path = write_report(tmp_path_factory.mktemp("report"), synthetic_report(), [overlay()])
    with sync_api.sync_playwright() as p:
        browser = tool.launch(p)
        page, network = tool.open_page(browser, html_path)
        yield tool, page, network, html_path
        browser.close()


def test_page_makes_no_network_request(opened):
    tool, page, network, html_path = opened
    assert network == []
    assert tool.measure(page, network, html_path)["network_requests"] == []


def test_failing_case_is_readable_in_the_first_viewport(opened):
    _, page, _, _ = opened
    comparison = page.locator(".card.fail .cmp").first
    box = comparison.bounding_box()
    assert box is not None and box["y"] + box["height"] <= 900 and box["x"] + box["width"] <= 1400
    assert comparison.inner_text() == "agreement 0.939 < 0.95"
    assert page.locator(".card.fail svg.chart").first.bounding_box()["y"] < 900


def test_tolerance_steps_once_per_level_where_it_changes(opened):
    _, page, _, _ = opened
    tol = page.locator('svg[aria-label="agreement — contrast"] path.tol').first
    assert tol.get_attribute("data-steps") == str(len(LEVELS))
    d = tol.get_attribute("d")
    heights = [float(y) for y in re.findall(r"[MV](?:[\d.]+ )?([\d.]+)H", d)]
    assert len(heights) == len(LEVELS) and len(set(heights)) == 2
    assert tol.bounding_box()["height"] > 5  # the riser is drawn: a visible step, not one flat line


def test_axis_titles_are_rendered(opened):
    _, page, _, _ = opened
    chart = page.locator('svg[aria-label="agreement — contrast"]').first
    titles = chart.locator("text.at").all_text_contents()
    assert all(t.is_visible() for t in chart.locator("text.at").all())
    assert "contrast: contrast reduction (0 = none, 1 = flat)" in titles
    assert "agreement (fraction of samples)" in titles
    assert 4 <= chart.locator("text.yt").count() <= 6


def test_filters_hide_passing_rows_and_other_pairs(opened):
    _, page, _, _ = opened
    page.locator("details").first.evaluate("d => d.open = true")
    passing = page.locator('#checks ~ details tr[data-v="pass"]')
    assert passing.first.is_visible()
    page.locator('#filters input[data-verdict="pass"]').uncheck()
    assert not passing.first.is_visible()
    page.locator('#filters input[data-verdict="pass"]').check()
    page.locator("#pair-filter").select_option("tiny-asym2")
    assert page.locator('.card[data-p="tiny-int8"]').first.is_hidden()
    page.locator("#pair-filter").select_option("")
