"""Open a report.html in headless Chromium: screenshot its first 1400x900 viewport and measure the page.

Run: .venv/bin/python tools/screenshot_report.py qrobust-report/report.html [--png report.png]

Prints one JSON line: bytes, page height (px), y of the first failing or expected-failure case, table
rows, and the network requests the page made (there should be none). Uses Debian's chromium (or
$QROBUST_CHROMIUM) through Playwright, with the flags that keep Chromium itself off the network.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

VIEWPORT = {"width": 1400, "height": 900}
# without the background-networking flags Chromium contacts Google hosts on its own
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FIRST_BAD = ".card.fail, .card.inconclusive, tr.fail, tr.inconclusive, tr.xfail"


def chromium() -> str | None:
    """The Chromium executable: $QROBUST_CHROMIUM, else chromium on the PATH."""
    return os.environ.get("QROBUST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def launch(playwright):
    return playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)


def open_page(browser, path: Path):
    """A page at the 1400x900 viewport showing ``path``, and the list of non-local URLs it requested."""
    page = browser.new_page(viewport=VIEWPORT)
    network: list[str] = []
    page.on("request", lambda r: network.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    page.goto(Path(path).resolve().as_uri())
    return page, network


def measure(page, network: list[str], path: Path) -> dict:
    first = page.locator(FIRST_BAD).first
    box = first.bounding_box() if first.count() else None
    return {"bytes": Path(path).stat().st_size, "height_px": page.evaluate("document.documentElement.scrollHeight"),
            "first_bad_y_px": None if box is None else round(box["y"]),
            "table_rows": page.locator("tr").count(), "network_requests": network}


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--png", type=Path, help="where to save the first viewport's screenshot")
    args = parser.parse_args()
    with sync_playwright() as p:
        browser = launch(p)
        page, network = open_page(browser, args.report)
        if args.png:
            page.screenshot(path=str(args.png))
        print(json.dumps(measure(page, network, args.report)))
        browser.close()


if __name__ == "__main__":
    main()
